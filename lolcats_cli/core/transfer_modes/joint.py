"""Joint attention transfer: every converted layer trains at once, on token ids, in one process
(docs/method.md section 3). The teacher's output goes on into the residual stream, so each layer still sees
exact teacher inputs; one optimizer holds every layer's attention parameters."""

from __future__ import annotations

from ...errors import ConfigError
from ..convert import attention_parameters
from ..data import build_datasets
from ..workspace import load_converted_model, record_run
from .common import (
    ATTENTION_WEIGHTS,
    TransferJob,
    TransferObjective,
    TransferResult,
    fit_layers,
    prepare_for_transfer,
    save_attention,
    write_metrics,
)


def run_joint(job: TransferJob) -> TransferResult:
    recipe, run_dir, device = job.recipe, job.run_dir, job.device
    if job.dist.world > 1:
        raise ConfigError(
            f"joint transfer runs in one process, but torchrun started {job.dist.world} (WORLD_SIZE)",
            "set transfer.block_size=k (or --block-size k) to spread blocks of k layers over the processes, "
            "or run without torchrun",
        )
    model, tokenizer, source = load_converted_model(recipe, device, mode="transfer")
    if not job.resume:
        record_run(run_dir, recipe, source)
    train, heldout = build_datasets(recipe.data, tokenizer)
    eval_ids = heldout.input_ids[: recipe.data.num_eval_sequences]
    if eval_ids.shape[0] == 0:
        raise ConfigError("data.holdout: no held-out sequences to evaluate on", "raise data.holdout")

    tcfg = recipe.transfer
    prepare_for_transfer(model, recipe)
    objective = TransferObjective(model, eval_ids, device, tcfg.mse_weight, tcfg.attn_ce_weight, run_dir)
    done = fit_layers(job, objective, attention_parameters(model), train.input_ids, run_dir / "checkpoints",
                      "attention transfer", resume=job.resume)
    fit = done.fit
    save_attention(model, run_dir / ATTENTION_WEIGHTS)
    write_metrics(run_dir, {
        "mode": "joint",
        "layers": done.layers,
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
    })
    return TransferResult(run_dir, done.layers, fit.steps, fit.tokens, fit.wall_time_s, fit.best_step, "joint")


__all__ = ["run_joint"]
