"""Joint attention transfer: every converted layer trains at once, on token ids, in one process
(docs/method.md section 3). The teacher's output goes on into the residual stream, so each layer still sees
exact teacher inputs; one optimizer holds every layer's attention parameters. :mod:`.fsdp` runs the same
over several processes."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ....errors import ConfigError
from ...data.data import build_datasets
from ...model.convert import attention_parameters
from ...model.models import resolve_dtype
from ...runs.rundir import ATTENTION_WEIGHTS, CHECKPOINTS
from ...runs.workspace import load_converted_model, record_run
from ..trainer import FitResult
from .common import (
    Fitted,
    TransferJob,
    TransferObjective,
    TransferResult,
    fit_layers,
    prepare_for_transfer,
    save_attention,
    write_metrics,
)


def setup_joint(job: TransferJob, load_on: torch.device) -> tuple[torch.nn.Module, torch.Tensor, TransferObjective]:
    """The converted model loaded on ``load_on`` (in the dtype ``job.device`` would get) and ready to train,
    the training ids and the objective (its held-out ids evaluated on ``job.device``); rank 0 records the run."""
    recipe = job.recipe
    dtype = str(resolve_dtype(recipe.model.dtype, job.device)).removeprefix("torch.")
    loading = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype=dtype))
    model, tokenizer, _ = load_converted_model(loading, load_on, mode="transfer")
    if not job.resume and job.dist.is_main:
        record_run(job.run_dir, recipe)
    train, heldout = build_datasets(recipe.data, tokenizer)
    eval_ids = heldout.input_ids[: recipe.data.num_eval_sequences]
    if eval_ids.shape[0] == 0:
        raise ConfigError("data.holdout: no held-out sequences to evaluate on", "raise data.holdout")
    prepare_for_transfer(model, recipe)
    tcfg = recipe.transfer
    objective = TransferObjective(model, eval_ids, job.device, tcfg.mse_weight, tcfg.attn_ce_weight, job.run_dir,
                                  window_sizes=recipe.attention.train_window_sizes)
    return model, train.input_ids, objective


def joint_metrics(mode: str, done: Fitted, train_ids: torch.Tensor, device: torch.device, **extra: Any) -> dict:
    fit: FitResult = done.fit
    return {
        "mode": mode,
        **extra,
        "layers": done.layers,
        "tokens_seen": fit.tokens,
        "wall_time_s": fit.wall_time_s,
        "tokens_per_s": fit.tokens / fit.wall_time_s if fit.wall_time_s > 0 else None,  # evaluations included
        "steps": fit.steps,
        "best_step": fit.best_step,
        "best_eval_loss": fit.best_loss,
        "eval_history": fit.history,
        "train_sequences": int(train_ids.shape[0]),
        "seq_len": int(train_ids.shape[1]),
        "device": str(device),
    }


def run_joint(job: TransferJob) -> TransferResult:
    model, train_ids, objective = setup_joint(job, job.device)
    done = fit_layers(job, objective, attention_parameters(model), train_ids, job.run_dir / CHECKPOINTS,
                      "attention transfer", resume=job.resume)
    fit = done.fit
    save_attention(model, job.run_dir / ATTENTION_WEIGHTS)
    write_metrics(job.run_dir, joint_metrics("joint", done, train_ids, job.device))
    return TransferResult(job.run_dir, done.layers, fit.steps, fit.tokens, fit.wall_time_s, fit.best_step, "joint")


__all__ = ["run_joint", "setup_joint", "joint_metrics"]
