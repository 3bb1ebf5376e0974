"""Stage 1, attention transfer (METHOD.md section 3).

Every converted layer runs in ``transfer`` mode: the teacher's softmax output goes on into the residual
stream while the student's hybrid output is scored against it (MSE before o_proj), so layers train
independently. Only the feature maps and the window factors train. The run directory receives the resolved
recipe, versions.json, checkpoints, ``attention.safetensors`` (the best trainables) and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, TrainingError
from .checkpoint import save_json, save_tensors
from .progress import Reporter
from .recipe import Recipe, load_recipe
from .trainer import Trainer, TrainSettings
from .workspace import RESOLVED_RECIPE, load_converted_model, pick_device, prepare_run_dir, record_run

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


def autocast_for(device: torch.device):
    """bf16 autocast on GPU, plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _layer_losses(model: torch.nn.Module) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
    from .convert import linearized_layers

    return [(i, m.transfer_loss, getattr(m, "transfer_ce", None)) for i, m in linearized_layers(model)]


def _window_factors(model: torch.nn.Module) -> dict[int, float]:
    from .convert import linearized_layers

    return {i: torch.sigmoid(m.window_logits.detach().float()).mean().item() for i, m in linearized_layers(model)}


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
    from its last checkpoint to exactly where an uninterrupted run would have ended.
    """
    from .convert import attention_state_dict, freeze_for_transfer, linearized_layers
    from .data import build_datasets

    run_dir = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        recipe = load_recipe(run_dir / RESOLVED_RECIPE)
    elif recipe is None:
        raise ConfigError("no recipe given", "pass --recipe or --model")
    device = pick_device(device)
    tcfg = recipe.transfer
    if tcfg.block_size is not None:
        raise ConfigError(
            f"transfer.block_size: block-wise transfer (block_size={tcfg.block_size}) is not implemented yet",
            "set transfer.block_size=null to train all layers jointly",
        )

    model, tokenizer, source = load_converted_model(recipe, device, mode="transfer")
    record_run(run_dir, recipe, source)
    train, heldout = build_datasets(recipe.data, tokenizer)
    eval_ids = heldout.input_ids[: recipe.data.num_eval_sequences]
    if eval_ids.shape[0] == 0:
        raise ConfigError("data.holdout: no held-out sequences to evaluate on", "raise data.holdout")

    for _, layer in linearized_layers(model):
        layer.attn_ce_queries = tcfg.attn_ce_queries if tcfg.attn_ce_weight > 0 else 0
    params = freeze_for_transfer(model)
    decoder = getattr(model, model.base_model_prefix)  # the transformer without its LM head

    def forward_losses(ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        with autocast_for(device):
            decoder(input_ids=ids, use_cache=False)
        return _layer_losses(model)

    def loss_fn(ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        per_layer = forward_losses(ids)
        for i, mse, ce in per_layer:
            if not torch.isfinite(mse) or (ce is not None and not torch.isfinite(ce)):
                raise TrainingError(
                    f"layer {i}: the attention-transfer loss became non-finite ({mse.item()})",
                    f"the last good checkpoint is kept in {run_dir / 'checkpoints'}; "
                    "lower transfer.lr and run again with --resume",
                )
        loss = tcfg.mse_weight * torch.stack([mse for _, mse, _ in per_layer]).mean()
        if tcfg.attn_ce_weight > 0:
            loss = loss + tcfg.attn_ce_weight * torch.stack([ce for _, _, ce in per_layer]).mean()
        return loss

    before: dict[int, float] = {}

    @torch.no_grad()
    def eval_fn() -> tuple[float, dict[str, Any]]:
        sums: dict[int, float] = {}
        for row in range(eval_ids.shape[0]):
            for i, mse, _ in forward_losses(eval_ids[row : row + 1].to(device)):
                sums[i] = sums.get(i, 0.0) + mse.item()
        mse = {i: s / eval_ids.shape[0] for i, s in sums.items()}
        if not before:
            before.update(mse)
        factors = _window_factors(model)
        layers = [
            {
                "layer": i,
                "mse_before": before[i],
                "mse": mse[i],
                "reduction_pct": 100.0 * (1 - mse[i] / before[i]) if before[i] > 0 else 0.0,
                "window_factor": factors[i],
            }
            for i in sorted(mse)
        ]
        return tcfg.mse_weight * sum(mse.values()) / len(mse), {"layers": layers}

    trainer = Trainer(
        params,
        TrainSettings.from_section(tcfg),
        train.input_ids,
        loss_fn,
        eval_fn,
        run_dir / "checkpoints",
        reporter=reporter,
        title="attention transfer",
        device=device,
    )
    if resume:  # the "before" numbers come from the run's first evaluation
        fit_history_first = _first_eval(run_dir)
        if fit_history_first:
            before.update(fit_history_first)
    fit = trainer.fit(resume=resume)
    trainer.restore_best()
    _, final = eval_fn()
    layers = [
        {k: v for k, v in dict(row, mse_after=row["mse"]).items() if k != "mse"} for row in final["layers"]
    ]
    save_tensors(run_dir / ATTENTION_WEIGHTS, attention_state_dict(model), metadata={"format": "lolcats-attention"})
    metrics = {
        "layers": layers,
        "tokens_seen": fit.tokens,
        "wall_time_s": fit.wall_time_s,
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
    from .checkpoint import load_json

    pointer = run_dir / "checkpoints" / "latest.json"
    if not pointer.exists():
        return {}
    state = load_json(run_dir / "checkpoints" / load_json(pointer)["folder"] / "state.json")
    if not state["history"]:
        return {}
    return {row["layer"]: row["mse"] for row in state["history"][0].get("layers", [])}


__all__ = ["run_transfer", "TransferResult", "ATTENTION_WEIGHTS", "METRICS", "autocast_for"]
