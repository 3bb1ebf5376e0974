"""``lolcats transfer --dry-run``: what a recipe needs (device memory, disk, time) on the hardware at hand, and
which mode runs it, from the model's shape alone: no weights are loaded.

The shape comes from the model's config (a local folder, a GGUF header, or the Hugging Face cache); for a hub
model that cannot be reached, from :data:`KNOWN_SHAPES`, the published configs of the models the shipped
recipes are written for. Compute is measured here with a short matmul; the estimates are rough (within about
2x): parameter and activation counts, FLOPs of the teacher forward and of the student's forward and backward.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ....errors import LolcatsError, ModelError
from ...model.models import EMBEDDED, read_base_config, resolve_dtype
from ...model.registry import build_feature_map, build_window
from ...recipe.init_recipe import run_name, stage_tokens
from ...recipe.recipe import Recipe
from .block_cache import DTYPES, disk_formula, free_bytes, human_bytes, plan_blocks
from .blockwise import converted_layers


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


# Published configs (config.json) of the models the shipped recipes are for, for when the hub is unreachable.
KNOWN_SHAPES: dict[str, Shape] = {
    "meta-llama/Llama-3.1-405B": Shape(126, 16384, 128, 8, 128, 53248, 128256),
    "meta-llama/Llama-3.1-70B": Shape(80, 8192, 64, 8, 128, 28672, 128256),
    "meta-llama/Llama-3.1-8B": Shape(32, 4096, 32, 8, 128, 14336, 128256),
    "meta-llama/Meta-Llama-3-8B": Shape(32, 4096, 32, 8, 128, 14336, 128256),
    "mistralai/Mistral-7B-v0.1": Shape(32, 4096, 32, 8, 128, 14336, 32000),
    "smollm2-135m": Shape(30, 576, 9, 3, 64, 1536, 49152, tied=True),
}
# Tokens of one epoch of the datasets the shipped recipes use (for the stored block inputs), roughly.
KNOWN_DATASET_TOKENS = {"yahma/alpaca-cleaned": 10_000_000, "pydoc": 113_000}
EFFICIENCY = {"cuda": 0.35, "cpu": 0.4}  # share of the measured matmul rate this workload reaches


def model_shape(recipe: Recipe) -> tuple[Shape, str]:
    """The model's shape and where it came from; ModelError when neither its config nor the table has it."""
    name = recipe.model.name
    if name not in EMBEDDED:
        try:
            c = read_base_config(recipe.model)
            heads = c.num_attention_heads
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
            shape = Shape(c.num_hidden_layers, c.hidden_size, heads, getattr(c, "num_key_value_heads", None) or heads,
                          head_dim, c.intermediate_size, c.vocab_size, bool(getattr(c, "tie_word_embeddings", False)))
            return shape, "its config.json"
        except LolcatsError as e:
            error = e
    else:
        error = None
    for known, shape in KNOWN_SHAPES.items():
        if known.lower() == name.lower():
            why = "the embedded model" if name in EMBEDDED else "the hub is unreachable"
            return shape, f"the published config built into lolcats ({why})"
    raise ModelError(
        f"--dry-run: cannot read the shape of model {name!r} ({error.message if error else 'unknown model'})",
        "pass a local folder with its config.json as --model (`hf download ID config.json` fetches only that file)",
    )


@dataclasses.dataclass(frozen=True)
class Hardware:
    kind: str  # "cuda" or "cpu"
    name: str
    devices: int
    memory: int  # bytes per device (RAM for the CPU)
    flops: float  # measured matmul FLOP/s per device

    @property
    def describe(self) -> str:
        if self.kind == "cpu":
            return f"{self.name}, {human_bytes(self.memory)} RAM, matmul measured at {self.flops / 1e9:.0f} GFLOP/s"
        return (f"{self.devices} x {self.name} ({human_bytes(self.memory)} each), matmul measured at "
                f"{self.flops / 1e12:.0f} TFLOP/s per GPU")


def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 0.2:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def detect_hardware() -> Hardware:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rate = _matmul_rate(torch.device("cuda", 0), torch.bfloat16, 4096)
        return Hardware("cuda", props.name, torch.cuda.device_count(), props.total_memory, rate)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    threads = torch.get_num_threads()
    name = f"CPU, {threads} thread{'s' if threads > 1 else ''}"
    return Hardware("cpu", name, 1, ram, _matmul_rate(torch.device("cpu"), torch.float32, 512))


@dataclasses.dataclass
class Plan:
    name: str  # the run name of the model
    model: str
    shape_source: str
    shape: Shape
    hardware: Hardware
    processes: int
    mode: str  # "joint", "fsdp" or "blockwise"
    mode_note: str
    memory: dict[str, int]  # per process: weights, activations, trainables, total
    disk: dict[str, Any]
    time_s: float
    flops: float
    tokens: dict[str, int]
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dataset_tokens(recipe: Recipe) -> tuple[int, bool]:
    """Tokens of one epoch of the training data: ``(tokens, known)``; unknown datasets assume 10M."""
    data = recipe.data
    base = KNOWN_DATASET_TOKENS.get(data.dataset, 10_000_000)
    if data.max_samples is not None and data.dataset == "pydoc":
        base = min(base, data.max_samples * data.seq_len)
    return base, data.dataset in KNOWN_DATASET_TOKENS


def plan_transfer(recipe: Recipe, *, processes: int | None = None, output: Path | None = None,
                  hardware: Hardware | None = None) -> Plan:
    """The plan of ``recipe``'s stage 1 on ``hardware`` (detected when None) with ``processes`` ranks."""
    shape, source = model_shape(recipe)
    hw = hardware or detect_hardware()
    world = processes or (hw.devices if hw.kind == "cuda" else 1)
    tcfg, att, seq = recipe.transfer, recipe.attention, recipe.data.seq_len
    dtype = resolve_dtype(recipe.model.dtype, torch.device(hw.kind))
    converted = converted_layers(recipe, shape.num_layers)

    fm = build_feature_map(att.feature_map, shape.heads, shape.head_dim, att.feature_map_params)
    f_out = fm(torch.zeros(1, shape.heads, 1, shape.head_dim)).shape[-1]
    per_head = 1 + att.linear_gate + att.decay + att.delta_rule * (shape.head_dim + 1)  # window, gate, decay, beta
    per_layer = 2 * sum(p.numel() for p in fm.parameters()) + shape.heads * per_head
    span = build_window(att.window, att.window_params).span

    # FLOPs per token: the teacher forward of one layer, the student's hybrid attention of one layer (x3: backward)
    teacher_layer = 2 * shape.layer_params + 4 * shape.heads * shape.head_dim * seq / 2
    student_layer = 3 * shape.heads * (2 * 2 * shape.head_dim * fm_width(fm) + 4 * span * shape.head_dim
                                       + 4 * f_out * shape.head_dim)
    # fp32 activations the student keeps for its backward, per token and trained layer (q, k, v, features, kernel)
    act_layer = 4 * shape.heads * (6 * shape.head_dim + 4 * f_out)
    micro = tcfg.batch_size * seq

    epoch_tokens, _ = _dataset_tokens(recipe)
    train_tokens = stage_tokens(tcfg, seq) or tcfg.epochs * epoch_tokens
    eval_tokens = (recipe.data.num_eval_sequences or recipe.data.holdout) * seq
    steps = max(1, math.ceil(train_tokens / (micro * tcfg.grad_accum)))
    evals = steps // tcfg.eval_every + 2
    weights = shape.params * dtype.itemsize
    problems: list[str] = []
    rate = hw.flops * EFFICIENCY[hw.kind]

    if tcfg.block_size is None:
        mode = "joint" if world == 1 else "fsdp"
        note = f"all {len(converted)} converted layers at once in one process" if world == 1 else (
            f"all {len(converted)} converted layers at once, the frozen weights sharded over {world} processes "
            "(FSDP2; one layer gathered at a time), the micro-batches split over them")
        gathered = 0 if world == 1 else shape.layer_params * dtype.itemsize
        memory = {"weights": math.ceil(weights / world) + gathered, "activations": len(converted) * act_layer * micro,
                  "trainables": 16 * per_layer * len(converted)}
        flops = (train_tokens + evals * eval_tokens) * (shape.num_layers * teacher_layer + len(converted) * student_layer)
        disk: dict[str, Any] = {"block_inputs": 0}
        wall = flops / (rate * world)
    else:
        k = tcfg.block_size
        blocks = plan_blocks(shape.num_layers, k, converted)
        mode = "blockwise"
        spread = f" over {world} processes (rank r trains blocks r, r+{world}, ...)" if world > 1 else " one after another"
        note = f"{len(blocks)} blocks of {k} layers{spread}; every process loads the whole model"
        memory = {"weights": weights, "activations": k * act_layer * micro, "trainables": 16 * per_layer * k}
        cache_tokens = min(epoch_tokens, train_tokens) + eval_tokens
        elem = DTYPES[tcfg.block_cache_dtype].itemsize
        need = elem * cache_tokens * shape.hidden * len(blocks)
        where = Path(output) if output is not None else Path("runs")
        free = free_bytes(where)
        disk = {"block_inputs": need, "formula": disk_formula(elem, cache_tokens, shape.hidden, len(blocks)),
                "free": free, "where": str(where)}
        if need > free:
            problems.append(f"disk: the block inputs need {human_bytes(need)}, {where} has {human_bytes(free)} free")
        teacher = cache_tokens * shape.num_layers * teacher_layer
        per_block = (train_tokens + evals * eval_tokens) * k * (teacher_layer + student_layer)
        flops = teacher + len(blocks) * per_block
        wall = (teacher / world + math.ceil(len(blocks) / world) * per_block) / rate
    memory["total"] = sum(memory.values())
    share = 1 if hw.kind == "cuda" else world  # CPU processes share the RAM
    if memory["total"] * share > hw.memory:
        where = "each GPU" if hw.kind == "cuda" else "the RAM"
        need = human_bytes(memory["total"]) + (f" x {world} processes" if share > 1 else " per process")
        problems.append(f"memory: {need}, {where} holds {human_bytes(hw.memory)}"
                        + (f" (try --gpus {hw.devices}: FSDP2 shards the weights)" if mode == "joint" and hw.devices > 1 else ""))
    return Plan(name=run_name(recipe.model.name), model=recipe.model.name, shape_source=source, shape=shape,
                hardware=hw, processes=world, mode=mode, mode_note=note, memory=memory, disk=disk, time_s=wall,
                flops=flops, tokens={"train": int(train_tokens), "eval_per_evaluation": int(eval_tokens),
                                     "steps": steps}, problems=problems)


def fm_width(fm: Any) -> int:
    """The feature map's projection width (``feature_dim`` where it has one, else the head size)."""
    return int(getattr(getattr(fm, "params", None), "feature_dim", 0) or getattr(fm, "head_dim", 64))


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def render_plan(plan: Plan) -> str:
    s, m = plan.shape, plan.memory
    lines = [
        f"model      {plan.model}: {s.num_layers} layers, hidden {s.hidden}, {s.heads} heads ({s.kv_heads} KV), "
        f"{s.params / 1e9:.2f}B parameters; shape from {plan.shape_source}",
        f"hardware   {plan.hardware.describe}; {plan.processes} process{'es' if plan.processes > 1 else ''}",
        f"mode       {plan.mode}: {plan.mode_note}",
        f"memory     {human_bytes(m['total'])} per process: weights {human_bytes(m['weights'])}, activations "
        f"{human_bytes(m['activations'])}, trainables + AdamW {human_bytes(m['trainables'])}",
    ]
    if plan.mode == "blockwise":
        d = plan.disk
        lines.append(f"disk       block inputs {human_bytes(d['block_inputs'])} ({d['formula']}); "
                     f"{human_bytes(d['free'])} free in {d['where']}")
    else:
        lines.append("disk       checkpoints only (a few MB); no stored block inputs")
    lines.append(f"time       about {_duration(plan.time_s)} here ({plan.tokens['train']:,} training tokens, "
                 f"{plan.tokens['steps']:,} updates, {plan.flops:.2e} FLOP)")
    lines += [f"[red]will not fit[/red]  {p}" for p in plan.problems] or ["[green]fits on this hardware[/green]"]
    return "\n".join(lines)


__all__ = ["Plan", "Shape", "Hardware", "KNOWN_SHAPES", "plan_transfer", "render_plan", "model_shape", "detect_hardware"]
