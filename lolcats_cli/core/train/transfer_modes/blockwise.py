"""Block-wise attention transfer (docs/method.md section 3, METHOD.md section 3): for models too large to
train jointly. The decoder layers are cut into blocks of ``transfer.block_size`` layers; the teacher runs once
over the training and held-out data and stores each block's raw residual input (:mod:`.block_cache`); then
every block trains on its own from those inputs (the teacher outputs of its attentions are recomputed from
them through the frozen block), each with its own optimizer and checkpoints; the blocks' attention parameters
are stitched into the one ``attention.safetensors`` joint transfer writes.

Under torchrun the ranks share the teacher pass (shard by shard) and the blocks (rank r trains blocks r,
r + W, ...); rank 0 stitches. A killed run resumes at the unfinished block (and the unfinished shard).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ....errors import ConfigError
from ...data.data import build_datasets
from ...model.architectures import arch_spec
from ...model.convert import attention_state_dict, load_attention_state_dict, set_mode
from ...model.linear_attention import linearized_layers
from ...model.models import load_tokenizer, read_base_config
from ...progress import NullReporter
from ...runs.rundir import ATTENTION_WEIGHTS, BLOCKS, CHECKPOINTS, METRICS
from ...runs.workspace import load_converted_model, record_run
from ..checkpoint import latest_checkpoint, load_json, load_tensors, save_json, save_tensors
from ..precision import autocast_for
from ..trainer import rows_read
from .block_cache import Block, BlockCache, check_disk, plan_blocks
from .common import (
    TransferJob,
    TransferObjective,
    TransferResult,
    fit_layers,
    layer_parameters,
    prepare_for_transfer,
    save_attention,
    write_metrics,
)


class _Skip(nn.Module):
    """Stands in for the decoder layers before a block: hands the residual stream on untouched."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Enough(Exception):
    """Raised by the teacher pass once the last block input it needs is captured (the rest would be wasted)."""


def _decoder(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def block_forward(model: nn.Module, block: Block, hidden: torch.Tensor) -> None:
    """Run decoder layers ``block.start .. block.stop - 1`` on their stored input ``hidden`` ``(B, T, D)``.

    Through the decoder's own forward (same causal mask, positions and RoPE as a full pass), with the layers
    before the block replaced by pass-throughs and those after it left out."""
    decoder, layers = _decoder(model), arch_spec(model.config).decoder_layers(model)
    dtype = next(p.dtype for p in layers[block.start].parameters())
    full = decoder.layers
    skip = _Skip()
    decoder.layers = nn.ModuleList([skip] * block.start + list(layers[block.start : block.stop]))
    try:
        decoder(inputs_embeds=hidden.to(dtype), use_cache=False)
    finally:
        decoder.layers = full


@torch.no_grad()
def teacher_inputs(model: nn.Module, ids: torch.Tensor, starts: list[int], device: torch.device) -> dict[int, torch.Tensor]:
    """The residual stream entering decoder layer ``s`` for each ``s`` in ``starts``: ``{s: (B, T, D)}`` on the
    CPU, from one teacher pass over ``ids`` (converted layers in teacher mode)."""
    layers = arch_spec(model.config).decoder_layers(model)
    got: dict[int, torch.Tensor] = {}
    last = max(starts)

    def capture(start: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            got[start] = hidden.detach().to("cpu", copy=True)
            if start == last:
                raise _Enough

        return hook

    handles = [layers[s].register_forward_pre_hook(capture(s), with_kwargs=True) for s in starts]
    try:
        with autocast_for(device):
            _decoder(model)(input_ids=ids.to(device), use_cache=False)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def converted_layers(recipe: Any, num_layers: int) -> list[int]:
    """The decoder layers ``recipe.attention.layers`` converts, in a model of ``num_layers`` (bad indices are
    left to the conversion, which names them)."""
    layers = recipe.attention.layers
    return list(range(num_layers)) if layers == "all" else sorted(i for i in layers if 0 <= i < num_layers)


def run_blockwise(job: TransferJob) -> TransferResult:
    recipe, run_dir, dist = job.recipe, job.run_dir, job.dist
    reporter = job.reporter or NullReporter()
    started = time.perf_counter()
    k = recipe.transfer.block_size
    tokenizer = load_tokenizer(recipe.model)
    train, heldout = build_datasets(recipe.data, tokenizer)
    eval_ids = heldout.input_ids[: recipe.data.num_eval_sequences]
    if eval_ids.shape[0] == 0:
        raise ConfigError("data.holdout: no held-out sequences to evaluate on", "raise data.holdout")
    config = read_base_config(recipe.model)
    num_layers = config.num_hidden_layers
    blocks = plan_blocks(num_layers, k, converted_layers(recipe, num_layers))
    num_train = int(train.input_ids.shape[0])
    read = rows_read(recipe.transfer, num_train, recipe.data.seq_len)  # a budget short of an epoch reads fewer
    cache = BlockCache(run_dir / BLOCKS, blocks, seq_len=recipe.data.seq_len, hidden=config.hidden_size,
                       dtype=recipe.transfer.block_cache_dtype,
                       rows={"train": num_train, "heldout": int(eval_ids.shape[0])},
                       row_ids={"train": read} if len(read) < num_train else None)
    pending = [b for b in blocks if not cache.is_trained(b)]
    line = check_disk(cache, pending, k, -(-num_layers // k))  # before the model is loaded
    if dist.is_main:
        reporter.log(line)

    model, _, _ = load_converted_model(recipe, job.device, mode="teacher")
    if not job.resume and dist.is_main:
        record_run(run_dir, recipe)
    teacher_start = time.perf_counter()
    if pending and not cache.complete():
        _teacher_pass(job, model, cache, pending, {"train": train.input_ids[read], "heldout": eval_ids})
        dist.barrier()
        if dist.is_main:
            cache.mark_complete()
    teacher_s = time.perf_counter() - teacher_start

    prepare_for_transfer(model, recipe)
    for block in blocks[dist.rank :: dist.world]:
        if cache.is_trained(block):
            if dist.is_main:
                reporter.log(f"{block.name} ({block.label}) is trained already")
            continue
        _train_block(job, model, cache, block, len(blocks))
    dist.barrier()  # every block is trained
    if dist.is_main:
        _stitch(job, model, cache, blocks, time.perf_counter() - started, teacher_s)
    dist.barrier()  # the run's files are written
    metrics = load_json(run_dir / METRICS)
    return TransferResult(run_dir, metrics["layers"], metrics["steps"], metrics["tokens_seen"],
                          metrics["wall_time_s"], None, "blockwise")


def _teacher_pass(job: TransferJob, model: nn.Module, cache: BlockCache, pending: list[Block],
                  data: dict[str, torch.Tensor]) -> None:
    """This rank's shards of the stored inputs (shard i goes to rank i mod W); shards on disk are kept."""
    reporter, dist = job.reporter or NullReporter(), job.dist
    set_mode(model, "teacher")
    starts = sorted({b.start for b in pending})
    batch = job.recipe.transfer.batch_size
    todo = [(split, shard, a, b) for split in data for shard, a, b in cache.shards(split)]
    mine = todo[dist.rank :: dist.world]
    t0, tokens = time.perf_counter(), 0
    for n, (split, shard, a, b) in enumerate(mine, 1):
        if cache.shard_done(split, shard, pending):
            continue
        parts: dict[int, list[dict[str, torch.Tensor]]] = {s: [] for s in starts}
        for row in range(a, b, batch):
            got = teacher_inputs(model, data[split][row : min(row + batch, b)], starts, job.device)
            for s in starts:
                parts[s].append(cache.pack(got[s]))  # in the stored dtype at once (float8: with its row scales)
        cache.write_shard(split, shard, parts, pending)
        tokens += (b - a) * cache.seq_len
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        reporter.log(f"teacher pass: {split} shard {shard + 1} stored ({n}/{len(mine)} on this rank, "
                     f"{tokens:,} tokens, {rate:,.0f} tok/s)")


def _train_block(job: TransferJob, model: nn.Module, cache: BlockCache, block: Block, total: int) -> None:
    tcfg = job.recipe.transfer
    layers = [(i, m) for i, m in linearized_layers(model) if block.start <= i < block.stop]
    params = layer_parameters(model, layers)
    ckpt = job.run_dir / CHECKPOINTS / block.name
    objective = TransferObjective(model, cache.stored("heldout", block), job.device, tcfg.mse_weight,
                                  tcfg.attn_ce_weight, forward=lambda x: block_forward(model, block, x),
                                  layers=layers, where=ckpt, window_sizes=job.recipe.attention.train_window_sizes)
    title = f"attention transfer, block {block.index + 1} ({block.label})"
    if job.dist.world > 1:
        title += f" on rank {job.dist.rank}"
    done = fit_layers(job, objective, params, cache.stored("train", block), ckpt, title,
                      resume=latest_checkpoint(ckpt) is not None)
    fit = done.fit
    save_tensors(cache.weights_path(block), block_state_dict(model, layers),
                 metadata={"format": "lolcats-attention", "block": block.name})
    save_json(cache.summary_path(block), {
        "block": block.name, "layers_range": [block.start, block.stop], "rank": job.dist.rank,
        "layers": done.layers, "steps": fit.steps, "tokens_seen": fit.tokens, "wall_time_s": fit.wall_time_s,
        "best_step": fit.best_step, "best_eval_loss": fit.best_loss, "eval_history": fit.history,
    })
    cache.drop_inputs(block)


def block_state_dict(model: nn.Module, layers: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
    """The part of :func:`attention_state_dict` (parameters and any plugin buffers) that belongs to ``layers``."""
    mine = {id(m) for _, m in layers}
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if id(m) in mine)
    return {n: t for n, t in attention_state_dict(model).items() if n.startswith(prefixes)}


def _stitch(job: TransferJob, model: nn.Module, cache: BlockCache, blocks: list[Block], wall_s: float,
            teacher_s: float) -> None:
    """Rank 0: every block's attention parameters into the one ``attention.safetensors``, and metrics.json."""
    state: dict[str, torch.Tensor] = {}
    summaries = []
    for block in blocks:
        state.update(load_tensors(cache.weights_path(block)))
        summaries.append(load_json(cache.summary_path(block)))
    load_attention_state_dict(model, state)  # strict: every converted layer must come from some block
    save_attention(model, job.run_dir / ATTENTION_WEIGHTS)
    layers = sorted((row for s in summaries for row in s["layers"]), key=lambda r: r["layer"])
    steps = max(s["steps"] for s in summaries)
    tokens = max(s["tokens_seen"] for s in summaries)
    write_metrics(job.run_dir, {
        "mode": "blockwise",
        "block_size": job.recipe.transfer.block_size,
        "layers": layers,
        "tokens_seen": tokens,  # each block's training tokens (every block sees the same rows)
        "steps": steps,
        "best_step": None,  # per block, in "blocks"
        "wall_time_s": wall_s,
        "teacher_pass_s": teacher_s,
        "tokens_per_s": tokens * len(blocks) / wall_s if wall_s > 0 else None,
        "blocks": [{k: v for k, v in s.items() if k != "eval_history"} for s in summaries],
        "eval_history": {s["block"]: s["eval_history"] for s in summaries},
        "block_inputs": {"dtype": cache.dtype_name, "tokens": cache.tokens, "bytes": cache.bytes_needed(blocks)},
        "train_sequences": cache.rows["train"],
        "seq_len": cache.seq_len,
        "world_size": job.dist.world,
        "device": str(job.device),
    })


__all__ = ["run_blockwise", "block_forward", "teacher_inputs", "block_state_dict", "converted_layers"]
