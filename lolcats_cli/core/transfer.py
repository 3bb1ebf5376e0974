"""Stage 1, attention transfer (docs/method.md section 3).

Every converted layer runs in ``transfer`` mode: the teacher's softmax output goes on into the residual
stream while the student's hybrid output is scored against it (MSE before o_proj), so layers train
independently. Only the feature maps and the window factors train. The run directory receives the resolved
recipe, versions.json, checkpoints, ``attention.safetensors`` (the best trainables) and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, TrainingError
from .checkpoint import save_json, save_tensors
from .precision import autocast_for
from .progress import Reporter
from .recipe import Recipe, load_recipe
from .trainer import Trainer, TrainSettings, latest_checkpoint
from .workspace import (
    RESOLVED_RECIPE,
    check_plugins,
    check_window_fits,
    load_converted_model,
    new_run_dir,
    pick_device,
    record_run,
)

ATTENTION_WEIGHTS = "attention.safetensors"
METRICS = "metrics.json"


@dataclasses.dataclass
class TransferResult:
    run_dir: Path
    layers: list[dict[str, Any]]  # layer, mse_before, mse_after, reduction_pct, window_factor
    steps: int
    tokens_seen: int
    wall_time_s: float
    best_step: int | None


def _layer_losses(model: torch.nn.Module) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
    from .convert import linearized_layers

    return [(i, m.transfer_loss, getattr(m, "transfer_ce", None)) for i, m in linearized_layers(model)]


def _window_factors(model: torch.nn.Module) -> dict[int, float]:
    from .convert import linearized_layers

    return {i: torch.sigmoid(m.window_logits.detach().float()).mean().item() for i, m in linearized_layers(model)}


class TransferObjective:
    """The stage-1 loss and held-out evaluation of a model whose converted layers are in transfer mode.

    ``loss(ids)``: ``mse_weight`` x the mean over layers of MSE(student, teacher) head outputs (+ the optional
    attention cross-entropy); a non-finite layer loss raises TrainingError naming the layer.
    ``evaluate()``: the same MSE per layer on held-out sequences, with the first evaluation kept as "before".
    """

    def __init__(self, model, eval_ids: torch.Tensor, device: torch.device, mse_weight: float,
                 ce_weight: float = 0.0, run_dir: Path | None = None) -> None:
        self.model, self.eval_ids, self.device = model, eval_ids, device
        self.mse_weight, self.ce_weight = mse_weight, ce_weight
        self.decoder = getattr(model, model.base_model_prefix)  # the transformer without its LM head
        self.where = run_dir / "checkpoints" if run_dir is not None else "the run directory"
        self.before: dict[int, float] = {}

    def _forward(self, ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        with autocast_for(self.device):
            self.decoder(input_ids=ids, use_cache=False)
        return _layer_losses(self.model)

    def loss(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
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

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict[str, Any]]:
        sums: dict[int, float] = {}
        for row in range(self.eval_ids.shape[0]):
            for i, mse, _ in self._forward(self.eval_ids[row : row + 1].to(self.device)):
                sums[i] = sums.get(i, 0.0) + mse.item()
        mse = {i: s / self.eval_ids.shape[0] for i, s in sums.items()}
        if not self.before:
            self.before.update(mse)
        factors = _window_factors(self.model)
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


def run_transfer(
    recipe: Recipe | None,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    device: str | torch.device | None = None,
) -> TransferResult:
    """Train the linear attentions of ``recipe.model`` to mimic its softmax attentions.

    With ``resume``, the recipe saved in ``run_dir`` is used (``recipe`` may be None) and the run continues
    from its last checkpoint to exactly where an uninterrupted run would have ended. A run that fails before
    its first checkpoint removes what it wrote (see :func:`~lolcats_cli.core.workspace.new_run_dir`); Ctrl-C
    raises :class:`~lolcats_cli.core.trainer.TrainingInterrupted`.
    """
    if not resume:
        if recipe is None:
            raise ConfigError("no recipe given", "pass --recipe or --model")
        check_plugins(recipe)  # before anything is written
        check_window_fits(recipe)
    with new_run_dir(run_dir, resume=resume, overwrite=overwrite) as run_dir:
        return _transfer(recipe, run_dir, resume, reporter, device)


def _transfer(recipe: Recipe | None, run_dir: Path, resume: bool, reporter: Reporter | None,
              device: str | torch.device | None) -> TransferResult:
    from .convert import attention_parameters, attention_state_dict, freeze_for_transfer, linearized_layers
    from .data import build_datasets

    if resume:
        recipe = load_recipe(run_dir / RESOLVED_RECIPE)
    device = pick_device(device)
    tcfg = recipe.transfer
    if tcfg.block_size is not None:
        raise ConfigError(
            f"transfer.block_size: block-wise transfer (block_size={tcfg.block_size}) is not implemented yet",
            "set transfer.block_size=null to train all layers jointly",
        )

    model, tokenizer, source = load_converted_model(recipe, device, mode="transfer")
    if not resume:
        record_run(run_dir, recipe, source)
    train, heldout = build_datasets(recipe.data, tokenizer)
    eval_ids = heldout.input_ids[: recipe.data.num_eval_sequences]
    if eval_ids.shape[0] == 0:
        raise ConfigError("data.holdout: no held-out sequences to evaluate on", "raise data.holdout")

    for _, layer in linearized_layers(model):
        layer.attn_ce_queries = tcfg.attn_ce_queries if tcfg.attn_ce_weight > 0 else 0
    freeze_for_transfer(model)
    params = attention_parameters(model)
    objective = TransferObjective(model, eval_ids, device, tcfg.mse_weight, tcfg.attn_ce_weight, run_dir)

    trainer = Trainer(
        params,
        TrainSettings.from_section(tcfg),
        train.input_ids,
        objective.loss,
        objective.evaluate,
        run_dir / "checkpoints",
        reporter=reporter,
        title="attention transfer",
        device=device,
    )
    if resume:  # the "before" numbers come from the run's first evaluation
        objective.before.update(_first_eval(run_dir))
    fit = trainer.fit(resume=resume)
    trainer.restore_best()
    _, final = objective.evaluate()
    layers = [
        {k: v for k, v in dict(row, mse_after=row["mse"]).items() if k != "mse"} for row in final["layers"]
    ]
    save_tensors(run_dir / ATTENTION_WEIGHTS, attention_state_dict(model), metadata={"format": "lolcats-attention"})
    metrics = {
        "layers": layers,
        "tokens_seen": fit.tokens,
        "wall_time_s": fit.wall_time_s,
        "tokens_per_s": fit.tokens / fit.wall_time_s if fit.wall_time_s > 0 else None,  # evaluations included
        "steps": fit.steps,
        "best_step": fit.best_step,
        "best_eval_loss": fit.best_loss,
        "eval_history": fit.history,
        "train_sequences": int(train.input_ids.shape[0]),
        "seq_len": int(train.input_ids.shape[1]),
        "device": str(device),
    }
    save_json(run_dir / METRICS, metrics)
    return TransferResult(run_dir, layers, fit.steps, fit.tokens, fit.wall_time_s, fit.best_step)


def _first_eval(run_dir: Path) -> dict[int, float]:
    """Per-layer MSE of the run's first evaluation (step 0), read back from its latest checkpoint."""
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None or not latest[1]["history"]:
        return {}
    return {row["layer"]: row["mse"] for row in latest[1]["history"][0].get("layers", [])}


__all__ = ["run_transfer", "TransferObjective", "TransferResult", "ATTENTION_WEIGHTS", "METRICS"]
