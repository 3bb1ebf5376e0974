"""What every attention-transfer mode shares: the objective, the job description, the fit of one set of layers
(trainer, checkpoints, keep-the-best, final per-layer table) and the run's output files.

A mode (``joint``, ``blockwise``) is a function ``run(job) -> TransferResult``; see ``transfer_modes/__init__``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ....errors import TrainingError
from ...model.convert import (
    attention_buffers,
    attention_parameters,
    attention_state_dict,
    freeze_for_transfer,
    linearized_layers,
    set_mode,
)
from ...progress import Reporter
from ...recipe.recipe import Recipe
from ...runs.rundir import CHECKPOINTS, METRICS
from ..checkpoint import latest_checkpoint, save_json, save_tensors
from ..precision import autocast_for
from ..train_window import random_window
from ..trainer import FitResult, RowSource, Trainer
from .distributed import Dist

@dataclasses.dataclass
class TransferResult:
    run_dir: Path
    layers: list[dict[str, Any]]  # layer, mse_before, mse_after, reduction_pct, window_factor
    steps: int
    tokens_seen: int
    wall_time_s: float
    best_step: int | None
    mode: str = "joint"


@dataclasses.dataclass
class TransferJob:
    """One stage-1 run as the modes see it: the recipe, the prepared run directory, the device of this
    process, the torch.distributed ranks (one rank when not launched by torchrun) and the reporter."""

    recipe: Recipe
    run_dir: Path
    resume: bool
    reporter: Reporter | None
    device: torch.device
    dist: Dist


Layers = Sequence[tuple[int, Any]]  # (layer index, LinearizedAttention)


class TransferObjective:
    """The stage-1 loss and held-out evaluation of converted layers in transfer mode.

    ``loss(inputs)``: ``mse_weight`` x the mean over ``layers`` of MSE(student, teacher) head outputs (+ the
    optional attention cross-entropy); a non-finite layer loss raises TrainingError naming the layer.
    ``evaluate()``: the same MSE per layer on held-out rows, with the first evaluation kept as "before".
    ``forward(inputs)`` runs the model on a batch (default: the decoder on token ids); ``layers`` are the
    converted layers it scores (default: all of ``model``'s). ``eval_ids``: a tensor or a RowSource.
    ``window_sizes`` (``attention.train_window_sizes``): each training batch runs a window size drawn from
    them (:mod:`~lolcats_cli.core.train.train_window`); evaluation always runs the layers' own window.
    """

    def __init__(self, model, eval_ids: torch.Tensor | RowSource, device: torch.device, mse_weight: float,
                 ce_weight: float = 0.0, run_dir: Path | None = None, *,
                 forward: Callable[[torch.Tensor], Any] | None = None, layers: Layers | None = None,
                 where: Path | None = None, window_sizes: Sequence[int] | None = None) -> None:
        self.window_sizes = window_sizes  # attention.train_window_sizes: a random window size per training batch
        self.model, self.eval_ids, self.device = model, eval_ids, device
        self.mse_weight, self.ce_weight = mse_weight, ce_weight
        decoder = getattr(model, model.base_model_prefix)  # the transformer without its LM head
        self.forward = forward or (lambda ids: decoder(input_ids=ids, use_cache=False))
        self.layers = list(layers) if layers is not None else linearized_layers(model)
        self.where = where or (run_dir / CHECKPOINTS if run_dir is not None else "the run directory")
        self.before: dict[int, float] = {}

    def _forward(self, inputs: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        with autocast_for(self.device):
            self.forward(inputs)
        return [(i, m.transfer_loss, getattr(m, "transfer_ce", None)) for i, m in self.layers]

    def loss(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with random_window([m for _, m in self.layers], self.window_sizes):
            per_layer = self._forward(ids)
        for i, mse, ce in per_layer:
            if not torch.isfinite(mse) or (ce is not None and not torch.isfinite(ce)):
                raise TrainingError(
                    f"layer {i}: the attention-transfer loss became non-finite ({mse.item()})",
                    f"the last good checkpoint is kept in {self.where}; lower transfer.lr and run again with --resume",
                )
        loss = self.mse_weight * torch.stack([mse for _, mse, _ in per_layer]).mean()
        if self.ce_weight > 0:
            loss = loss + self.ce_weight * torch.stack([ce for _, _, ce in per_layer]).mean()
        return loss

    def backward(self, ids: torch.Tensor, labels: torch.Tensor | None, scale: float) -> torch.Tensor:
        """:meth:`loss` with the backward of ``scale`` x the loss run layer by layer during the forward (each
        layer's loss depends on that layer's trainables only, so the gradients are those of one backward of the
        sum): peak memory holds one layer's graph instead of every layer's. Returns the loss, detached."""
        n = len(self.layers)
        for _, m in self.layers:
            m.eager_backward = (scale * self.mse_weight / n, scale * self.ce_weight / n)
        try:
            return self.loss(ids, labels)
        finally:
            for _, m in self.layers:
                m.eager_backward = None

    def _eval_row(self, row: int) -> torch.Tensor:
        if isinstance(self.eval_ids, torch.Tensor):
            return self.eval_ids[row : row + 1]
        return self.eval_ids.take(torch.tensor([row]))

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict[str, Any]]:
        n = self.eval_ids.shape[0] if isinstance(self.eval_ids, torch.Tensor) else self.eval_ids.num_rows
        sums: dict[int, float] = {}
        for row in range(n):
            for i, mse, _ in self._forward(self._eval_row(row).to(self.device)):
                sums[i] = sums.get(i, 0.0) + mse.item()
        mse = {i: s / n for i, s in sums.items()}
        if not self.before:
            self.before.update(mse)
        factors = {i: torch.sigmoid(m.window_logits.detach().float()).mean().item() for i, m in self.layers}
        layers = [
            {
                "layer": i,
                "mse_before": self.before[i],
                "mse": mse[i],
                "reduction_pct": 100.0 * (1 - mse[i] / self.before[i]) if self.before[i] > 0 else 0.0,
                "window_factor": factors[i],
            }
            for i in sorted(mse)
        ]
        return self.mse_weight * sum(mse.values()) / len(mse), {"layers": layers}


def prepare_for_transfer(model: torch.nn.Module, recipe: Recipe) -> None:
    """Every converted layer in transfer mode with the recipe's attention cross-entropy; only the attention
    parameters trainable."""
    tcfg = recipe.transfer
    set_mode(model, "transfer")
    for _, layer in linearized_layers(model):
        layer.attn_ce_queries = tcfg.attn_ce_queries if tcfg.attn_ce_weight > 0 else 0
    freeze_for_transfer(model)


def layer_parameters(model: torch.nn.Module, layers: Layers) -> dict[str, torch.nn.Parameter]:
    """The attention parameters of ``layers`` by their state-dict names in ``model``, in model order."""
    wanted = {id(p) for _, m in layers for p in m.attention_parameters().values()}
    return {name: p for name, p in attention_parameters(model).items() if id(p) in wanted}


@dataclasses.dataclass
class Fitted:
    fit: FitResult
    layers: list[dict[str, Any]]  # the final held-out table, mse_after for mse


def fit_layers(job: TransferJob, objective: TransferObjective, params: dict[str, torch.nn.Parameter],
               rows: torch.Tensor | RowSource, ckpt_dir: Path, title: str, *, resume: bool,
               ranks: tuple[int, int] = (0, 1), per_layer_backward: bool = True) -> Fitted:
    """Train ``params`` on ``rows`` with ``objective`` (with ``resume``, from the newest checkpoint in
    ``ckpt_dir``), keep the best, and evaluate it once more for the final per-layer table. ``ranks``: see
    :class:`~lolcats_cli.core.train.trainer.Trainer` (data-parallel over torchrun ranks). ``per_layer_backward``:
    each layer's backward runs as soon as its loss exists (:meth:`TransferObjective.backward`); off for a sharded
    model, whose backward hooks expect one backward per forward."""
    params = {**params, **attention_buffers(objective.model)}  # buffers never train, but checkpoints keep them
    trainer = Trainer(params, job.recipe.transfer, rows, objective.loss,
                      objective.evaluate, ckpt_dir, reporter=job.reporter, title=title, device=job.device,
                      ranks=ranks, backward_fn=objective.backward if per_layer_backward else None)
    if resume:  # the "before" numbers come from the first evaluation of this set of layers
        objective.before.update(first_eval(ckpt_dir))
    fit = trainer.fit(resume=resume)
    trainer.restore_best()
    _, final = objective.evaluate()
    layers = [{k: v for k, v in dict(row, mse_after=row["mse"]).items() if k != "mse"} for row in final["layers"]]
    return Fitted(fit, layers)


def first_eval(ckpt_dir: Path) -> dict[int, float]:
    """Per-layer MSE of a fit's first evaluation (step 0), read back from its latest checkpoint."""
    latest = latest_checkpoint(ckpt_dir)
    if latest is None or not latest[1]["history"]:
        return {}
    return {row["layer"]: row["mse"] for row in latest[1]["history"][0].get("layers", [])}


def save_attention(model: torch.nn.Module, path: Path) -> None:
    """``attention.safetensors`` as every later stage reads it (the format joint and block-wise share)."""
    save_tensors(path, attention_state_dict(model), metadata={"format": "lolcats-attention"})


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` of a transfer run; on CUDA with this process's peak GPU memory (``peak_gpu_mem_gib``)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics = {**metrics, "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    save_json(run_dir / METRICS, metrics)


__all__ = [
    "TransferResult", "TransferJob", "TransferObjective", "prepare_for_transfer",
    "layer_parameters", "Fitted", "fit_layers", "first_eval", "save_attention", "write_metrics",
]
