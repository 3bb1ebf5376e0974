"""Stage 2, low-rank adaptation (docs/method.md section 4).

Starts from a finished transfer run: the linearized model with its trained attentions, in student mode.
LoRA (peft) goes on the recipe's targets (q, k, v, o projections by default); feature maps and window
factors stay frozen unless ``finetune.train_attention``. The loss is next-token cross-entropy, with prompt
tokens masked for instruction data, or (``finetune.objective: kl``) the token-level KL divergence to the
teacher's next-token distribution, the teacher being the same model with its original softmax attention and
LoRA disabled (:func:`teacher_view`), so no second copy of the weights is held. The finetune run directory is self-contained: the resolved recipe, a
copy of ``attention.safetensors``, the peft adapter in ``adapter/`` (adapter_config.json +
adapter_model.safetensors), ``metrics.json`` and ``checkpoints/``.

Under torchrun (``torchrun --nproc-per-node N -m lolcats_cli finetune ...``; gloo on CPU, nccl on CUDA) every
rank opens the transfer run on its own device, and the frozen weights are sharded over the ranks with FSDP2
(one group per decoder layer plus the whole model, :func:`~.transfer_modes.fsdp.shard_model`); the
trainables (the LoRA weights, and the attention parameters) stay whole on every rank. Each update's
micro-batches are split over the ranks and their gradients summed (:class:`~.trainer.Trainer`), so the run
matches the one-process run up to float reassociation, as long as nothing random runs inside a micro-batch
(``lora.dropout`` 0 and no ``attention.train_window_sizes``: each rank draws from the step's seed, not after
the micro-batches before it). Rank 0 writes the run directory; the adapter holds the full LoRA weights.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError
from ..eval.evaluate import mean_token_nll as heldout_loss
from ..model.convert import attention_parameters, attention_state_dict, teacher_view
from ..model.linear_attention import linearized_layers
from ..progress import Reporter
from ..recipe.recipe import Recipe, apply_overrides, load_recipe
from ..runs.rundir import ADAPTER_DIR, ATTENTION_WEIGHTS, CHECKPOINTS, METRICS, RESOLVED_RECIPE, SOURCE
from ..runs.workspace import new_run_dir, open_run, record_run
from .checkpoint import load_json, save_json, save_tensors
from .precision import autocast_for
from .train_window import random_window
from .trainer import Trainer
from .transfer_modes.distributed import Dist, session


@dataclasses.dataclass
class FinetuneResult:
    run_dir: Path
    steps: int
    tokens_seen: int
    wall_time_s: float
    ppl_before: float
    ppl_after: float


IGNORE = -100


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Mean token-level ``KL(teacher || student)`` of next-token distributions, fp32.

    logits ``(B, T, V)``; position t predicts token t + 1, so only positions ``0 .. T-2`` count, and with
    ``labels`` ``(B, T)`` only those whose next label is not -100 (prompt tokens stay masked).
    """
    s = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)
    t = torch.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    per_token = (t.exp() * (t - s)).sum(dim=-1)  # (B, T - 1)
    if labels is None:
        return per_token.mean()
    keep = (labels[:, 1:] != IGNORE).to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0)


@torch.no_grad()
def heldout_kl(model: Any, input_ids: torch.Tensor, labels: torch.Tensor | None, device: torch.device) -> float:
    """:func:`distill_kl` of ``model`` to its :func:`teacher_view` over held-out sequences, one at a time."""
    total, count = 0.0, 0
    for i in range(input_ids.shape[0]):
        ids = input_ids[i : i + 1].to(device)
        lab = None if labels is None else labels[i : i + 1].to(device)
        with teacher_view(model), autocast_for(device):
            teacher = model(input_ids=ids, use_cache=False).logits
        with autocast_for(device):
            total += float(distill_kl(model(input_ids=ids, use_cache=False).logits, teacher, lab))
        count += 1
    return total / max(count, 1)


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    lora = recipe.finetune.lora
    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
        bias="none", task_type="CAUSAL_LM",
    )


def run_finetune(
    source_run: Path,
    run_dir: Path | None = None,
    overrides: list[str] = (),
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    device: str | torch.device | None = None,
) -> FinetuneResult:
    """LoRA-finetune the linearized model of ``source_run`` (a transfer run directory).

    A run that fails before its first checkpoint removes what it wrote; Ctrl-C raises
    :class:`~lolcats_cli.core.train.trainer.TrainingInterrupted`. Under torchrun (WORLD_SIZE > 1) every rank calls
    this; rank 0 prepares the run directory and reports, the others wait for it and stay quiet.
    """
    source_run = Path(source_run)
    run_dir = Path(run_dir) if run_dir is not None else source_run.with_name(source_run.name + "-finetune")
    with session(device) as dist:
        if not dist.is_main:
            dist.barrier()  # rank 0 has prepared the folder
            return _finetune(source_run, run_dir, list(overrides), resume, None, dist.device(device), dist)
        with new_run_dir(run_dir, resume=resume, overwrite=overwrite) as run_dir:
            dist.barrier()
            return _finetune(source_run, run_dir, list(overrides), resume, reporter, dist.device(device), dist)


def _finetune(source_run: Path, run_dir: Path, overrides: list[str], resume: bool, reporter: Reporter | None,
              device: torch.device, dist: Dist) -> FinetuneResult:
    from peft import get_peft_model

    from ..data.data import build_datasets
    from ..model.softmax_layers import resolve_softmax_layers

    if resume:
        recipe = load_recipe(run_dir / RESOLVED_RECIPE)
        source_run = Path(load_json(run_dir / SOURCE)["transfer_run"])
    _, model, tokenizer = open_run(source_run, device, mode="student")
    if not resume:
        base = load_recipe(source_run / RESOLVED_RECIPE)
        recipe = Recipe.from_dict(apply_overrides(base.to_dict(), list(overrides)))
        # the layers the transfer run keeps as softmax, by index: this run never reads its metrics again
        softmax = resolve_softmax_layers(base.attention.softmax_layers, source_run)
        recipe.attention.softmax_layers = softmax or None
        if dist.is_main:
            save_json(run_dir / SOURCE, {"transfer_run": str(source_run.resolve())})  # before the recipe,
            record_run(run_dir, recipe)  # which marks a run directory that --resume can start again from
            shutil.copyfile(source_run / ATTENTION_WEIGHTS, run_dir / ATTENTION_WEIGHTS)
    fcfg = recipe.finetune
    if fcfg.lora.rank <= 0:
        raise ConfigError(f"finetune.lora.rank: must be positive (got {fcfg.lora.rank})", "the paper uses 8")

    train, heldout = build_datasets(recipe.data, tokenizer)
    labels = train.labels if fcfg.mask_prompt else None
    eval_ids = heldout.input_ids[: recipe.data.num_eval_sequences]
    eval_labels = heldout.labels[: recipe.data.num_eval_sequences] if fcfg.mask_prompt else None

    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(fcfg.seed)  # the LoRA initialisation: the same on every rank and in every process
    model = get_peft_model(model, lora_config(recipe))
    if fcfg.train_attention:
        for p in attention_parameters(model).values():
            p.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():  # fp32 master weights
        p.data = p.data.float()
    if dist.world > 1:  # the frozen weights sharded over the ranks; the trainables whole on each
        from .transfer_modes.fsdp import shard_model

        shard_model(model.get_base_model(), device, dist.world, keep=params.values(), whole=True)

    window_sizes = recipe.attention.train_window_sizes  # a random window size per batch (core/train/train_window.py)
    hybrid_layers = [m for _, m in linearized_layers(model)]

    def loss_fn(ids: torch.Tensor, lab: torch.Tensor | None) -> torch.Tensor:
        with random_window(hybrid_layers, window_sizes):
            return objective_loss(ids, lab)

    def objective_loss(ids: torch.Tensor, lab: torch.Tensor | None) -> torch.Tensor:
        if fcfg.objective == "kl":
            with torch.no_grad(), teacher_view(model), autocast_for(device):
                teacher = model(input_ids=ids, use_cache=False).logits
            with autocast_for(device):
                return distill_kl(model(input_ids=ids, use_cache=False).logits, teacher, lab)
        with autocast_for(device):
            return model(input_ids=ids, labels=ids if lab is None else lab, use_cache=False).loss.float()

    def eval_fn() -> tuple[float, dict[str, Any]]:
        """The held-out value of the training objective (the best step is chosen by it), plus perplexity."""
        loss = heldout_loss(model, eval_ids, eval_labels, device)
        details = {"perplexity": math.exp(min(loss, 50.0))}
        if fcfg.objective == "kl":
            details["kl"] = heldout_kl(model, eval_ids, eval_labels, device)
            return details["kl"], details
        return loss, details

    trainer = Trainer(
        params, fcfg, train.input_ids, loss_fn, eval_fn, run_dir / CHECKPOINTS,
        labels=labels, reporter=reporter, title="LoRA finetune", device=device, ranks=(dist.rank, dist.world),
    )
    fit = trainer.fit(resume=resume)
    trainer.restore_best()
    _, final = eval_fn()  # on every rank: the sharded model all-gathers its weights in each forward
    first = fit.history[0]["perplexity"] if fit.history else final["perplexity"]
    result = FinetuneResult(run_dir, fit.steps, fit.tokens, fit.wall_time_s, first, final["perplexity"])
    if dist.is_main:  # the LoRA weights (whole on every rank) as peft would take them from model.state_dict()
        model.save_pretrained(run_dir / ADAPTER_DIR, safe_serialization=True, state_dict=dict(params))
        save_tensors(run_dir / ATTENTION_WEIGHTS, attention_state_dict(model), metadata={"format": "lolcats-attention"})
        save_json(run_dir / METRICS, {
            "stage": "finetune", "transfer_run": str(source_run), "steps": fit.steps, "tokens_seen": fit.tokens,
            "wall_time_s": fit.wall_time_s, "best_step": fit.best_step,
            "tokens_per_s": fit.tokens / fit.wall_time_s if fit.wall_time_s > 0 else None,  # evaluations included
            "heldout_ppl_before": result.ppl_before, "heldout_ppl_after": result.ppl_after, "eval_history": fit.history,
            "trainable_parameters": sum(p.numel() for p in params.values()), "device": str(device),
            "world_size": dist.world, "objective": fcfg.objective,
            "passkey_sequences": int(train.stats.get("passkey_sequences", 0)),
        })
    dist.barrier()  # the run directory is complete before any rank returns
    return result


__all__ = ["run_finetune", "FinetuneResult", "lora_config", "heldout_loss", "distill_kl", "heldout_kl"]
