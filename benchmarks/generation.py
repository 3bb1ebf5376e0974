"""Decode speed and memory of a converted (hybrid) model against the same weights in softmax, engine by engine.

A benchmark, not a test. For each context, batch size and engine it fills the cache with ``context`` tokens per
row, then times ``--steps`` greedy decode steps of one token per row: tokens/s, ms per step, on a GPU the kernel
time per step (profiler) and the GPU-busy fraction (kernel time / wall time), the state (or KV cache) per
sequence, peak memory and, for the static engines, which decode step ran (``step``: triton or torch). Engines
(``--engines``):

* ``hybrid-eager``: the converted model through transformers, one ``HybridLayer`` step per layer (the reference);
* ``hybrid-static``: the static decode path (``core/decode/static_decode.py``): preallocated state buffers, one model
  step captured in a CUDA graph and replayed (eager static steps off CUDA); on CUDA with Triton its layers run the
  fused Triton step (``kernels/triton_step.py``) where it runs;
* ``hybrid-static-torch``: the same with the PyTorch step (``kernels/static.py``) forced, to time both in one run;
* ``hybrid-static-compiled``: ``hybrid-static`` with the step compiled by ``torch.compile`` (inductor on CUDA,
  ``--cpu-compile-backend`` off CUDA) before the graph is captured (``LOLCATS_COMPILE_DECODE``);
* ``softmax-eager``: the same weights in teacher mode with a growing ``DynamicCache``;
* ``softmax-compiled``: teacher mode with a transformers ``StaticCache`` and ``torch.compile`` (reduce-overhead
  on CUDA).

The cache is filled (``--prefill``) by a ``real`` prefill of random tokens (chunks of ``--prefill-chunk``, the last
position's logits only) or a ``synthetic`` one: random state / KV tensors of the right shapes and length, which
decode exactly as fast (no step reads the values to decide anything) and cost no prefill time; ``auto`` (the
default) prefills for real up to ``--real-prefill-max`` tokens (batch x context) and synthesises above;
``--pad-fraction F`` left-pads the real prompts to different lengths (row b by ``F x context x b / (batch - 1)``
tokens, so prefill goes through the padded forms). Every
(context, batch, engine) runs on its own: an error or out-of-memory is reported in its row and the rest goes on.
Rows print as they finish and go to a JSON file (``--json``, default ``benchmarks/results/generation-*.json``)
rewritten after each; a Rich table closes the run. ``--search-max`` keeps doubling the batch of
``hybrid-static`` after the listed ones until it runs out of memory. Examples:

    python benchmarks/generation.py                                   # SmolLM2-135M shapes, random weights
    python benchmarks/generation.py --preset llama-3.1-8b --random-weights --batch-sizes 1 16 64 256 1024 \
        --contexts 1024 4096 16384 --steps 128 --search-max       # the issue's grid on a GPU
    python benchmarks/generation.py --preset llama-3.1-8b --layers 2  # its first 2 layers (fits a laptop's RAM)
    python benchmarks/generation.py --model smollm2-135m              # the real embedded model
    python benchmarks/generation.py --window sliding --window-size 64 --layers 4 --contexts 256 2048
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from profiling import gpu_busy_ms

# Model shapes for random-weight runs (no hub access needed): ``--preset NAME`` -> (model_type, config).
# Speed and memory depend on the shapes only; RoPE scaling and the like are left out.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": ("llama", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=65536, rope_theta=100000.0, tie_word_embeddings=True)),
    "llama-3.1-8b": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False)),
    "mistral-7b": ("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=32000, max_position_embeddings=32768, rope_theta=10000.0, sliding_window=None,
        tie_word_embeddings=False)),
    "qwen2.5-0.5b": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True)),
}  # fmt: skip


def preset_config(name: str, layers: int | None = None) -> Any:
    """The transformers config of preset ``name`` (its first ``layers`` layers if given)."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise SystemExit(f"--preset {name!r}: unknown; choose one of {', '.join(PRESETS)}")
    model_type, cfg = PRESETS[name]
    config = AutoConfig.for_model(model_type, **{**cfg, **({"num_hidden_layers": layers} if layers else {})})
    config._attn_implementation = "sdpa"
    return config


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """The real model (``--model``) or random weights of ``--preset``'s shapes, on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    if args.model:
        from lolcats_cli.core.model.models import load_model
        from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides

        recipe = Recipe.from_dict(apply_overrides(Recipe().to_dict(), [f"model.name={args.model}"]))
        model, _, _ = load_model(recipe.model, device=device)
        return model.to(dtype).eval()
    config = preset_config(args.preset, args.layers)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model: Any, cache: Any, ids: torch.Tensor, chunk: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ``ids`` ``(B, T)`` into ``cache`` in chunks of ``chunk`` tokens; the logits of the last position
    ``(B, 1, vocab)`` (every call computes the last position's logits only, not ``T x vocab``). ``mask`` ``(B, T)``:
    the attention mask of left-padded rows (0 on the pads), passed as far as each chunk reaches."""
    from lolcats_cli.hf_compat import cache_kwarg, last_logits_kwargs

    if chunk < 1:
        raise SystemExit(f"--prefill-chunk {chunk}: must be at least 1")
    kwargs = {cache_kwarg(model): cache, "use_cache": True, **last_logits_kwargs(model)}
    for a in range(0, ids.shape[1], chunk):
        extra = {} if mask is None else {"attention_mask": mask[:, : a + chunk]}
        logits = model(ids[:, a : a + chunk], **kwargs, **extra).logits
    return logits[:, -1:]


def left_padded(ids: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts of different lengths: row b of ``ids`` ``(B, T)`` left-padded (token 0, mask 0) by
    ``round(fraction * T * b / (B - 1))`` tokens, so the last row keeps ``(1 - fraction) T`` tokens. The ids and
    the mask (None for ``fraction`` 0)."""
    if not 0 <= fraction < 1:
        raise SystemExit(f"--pad-fraction {fraction}: must be at least 0 and below 1")
    if fraction == 0:
        return ids, None
    B, T = ids.shape
    pads = torch.round(fraction * T * torch.arange(B, device=ids.device) / max(B - 1, 1)).long()
    mask = (torch.arange(T, device=ids.device)[None] >= pads[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask




ENGINES = ("hybrid-eager", "hybrid-static", "hybrid-static-torch", "hybrid-static-compiled", "softmax-eager",
           "softmax-compiled")
RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_hybrid_cache(model: Any, batch: int, context: int, device: torch.device, dtype: torch.dtype) -> Any:
    """A cache of random hybrid states at length ``context``: the shapes a real prefill leaves (decode is as fast)."""
    from lolcats_cli.core.decode.cache import make_cache
    from lolcats_cli.core.decode.static_decode import empty_hybrid_state
    from lolcats_cli.core.model.linear_attention import linearized_layers

    cache = make_cache(model)
    for i, m in linearized_layers(model):
        state = empty_hybrid_state(m, batch, device, dtype)
        for t in (state.k_buf, state.v_buf, state.k_sink, state.v_sink):
            if t is not None:
                t.normal_()
        state.S.uniform_(0.0, 1.0)
        state.z.uniform_(0.5, 1.5)
        state.length = context
        cache.layers[i].state, cache.layers[i].is_initialized = state, True
    return cache


def randomize_static(decoder: Any, context: int) -> None:
    """Random states of length ``context`` in a StaticDecoder's buffers (what a prefill leaves, shape for shape)."""
    for layer in decoder.layers:
        st = layer.static
        for t in (st.k_ring, st.v_ring, st.k_sink, st.v_sink):
            if t is not None:
                t.normal_()
        st.S.uniform_(0.0, 1.0)
        st.z.uniform_(0.5, 1.5)
        st.length.fill_(context)
        st.pads.zero_()
        layer.length = context
    decoder.positions.fill_(context)


def fill_kv(cache: Any, model: Any, batch: int, context: int, device: torch.device, dtype: torch.dtype) -> None:
    """Random keys and values for ``context`` positions in every layer of a softmax cache."""
    config = model.config.get_text_config(decoder=True)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        k = torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype)
        layer.update(k, torch.randn_like(k))


def new_cache(model: Any, engine: str, batch: int, context: int, args: argparse.Namespace) -> Any:
    from transformers import DynamicCache, StaticCache

    from lolcats_cli.core.decode.cache import make_cache

    if engine.startswith("hybrid"):
        return make_cache(model)
    if engine == "softmax-compiled":
        room = context + args.warmup + args.steps + 16
        return StaticCache(config=model.config, max_cache_len=room)
    return DynamicCache(config=model.config)


def cache_bytes(cache: Any) -> int:
    from lolcats_cli.core.decode.generation import state_nbytes

    return state_nbytes(cache)


Step = tuple[Callable[[], None], Callable[[], int], Callable[[], "str | None"]]


def decode_step(model: Any, engine: str, cache: Any, nxt: torch.Tensor, context: int, args: argparse.Namespace,
                device: torch.device) -> Step:  # fmt: skip
    """``(step, state_bytes, step_name)``: one greedy decode step of ``engine`` after ``cache``, the bytes it holds,
    and which attention step it ran (``triton`` or ``torch`` for the static engines, None for the others)."""
    from lolcats_cli.hf_compat import cache_kwarg, last_logits_kwargs

    box = {"tok": nxt.view(-1, 1)}
    kwargs = {cache_kwarg(model): cache, "use_cache": True, **last_logits_kwargs(model)}
    if engine.startswith("hybrid-static"):
        from lolcats_cli.core.decode.static_decode import StaticDecoder

        compiled = engine == "hybrid-static-compiled"
        compiler = ("inductor" if device.type == "cuda" else args.cpu_compile_backend) if compiled else ""
        decoder = StaticDecoder(model, nxt.shape[0], triton=engine != "hybrid-static-torch", compiler=compiler)
        if cache is None:  # synthetic: random buffers at length `context`, no eager copy (it would double the memory)
            randomize_static(decoder, context)
        else:
            decoder.load(cache)
            for layer in cache.layers:  # the eager copy of the state is not needed any more
                layer.state = None

        def static_step() -> None:
            box["tok"] = decoder.step(box["tok"]).argmax(dim=-1)

        return static_step, decoder.state_nbytes, lambda: decoder.step_name
    if engine == "softmax-compiled":
        positions = torch.full((nxt.shape[0], 1), context, dtype=torch.long, device=device)
        options = dict(mode="reduce-overhead") if device.type == "cuda" else dict(backend=args.cpu_compile_backend)
        forward = torch.compile(model.forward, dynamic=False, **options)

        def compiled_step() -> None:
            out = forward(input_ids=box["tok"], position_ids=positions, **kwargs)
            box["tok"] = out.logits[:, -1:].argmax(dim=-1)
            positions.add_(1)

        return compiled_step, lambda: cache_bytes(cache), lambda: None

    def eager_step() -> None:
        box["tok"] = model(box["tok"], **kwargs).logits[:, -1:].argmax(dim=-1)

    return eager_step, lambda: cache_bytes(cache), lambda: None


@torch.no_grad()
def run_engine(model: Any, engine: str, batch: int, context: int, args: argparse.Namespace,
               device: torch.device, dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    """Fill a cache for ``batch`` rows of ``context`` tokens, then time ``args.steps`` decode steps of ``engine``."""
    from lolcats_cli.core.model.convert import set_mode

    set_mode(model, "student" if engine.startswith("hybrid") else "teacher")
    synthetic = args.prefill == "synthetic" or (args.prefill == "auto" and batch * context > args.real_prefill_max)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    if synthetic and engine.startswith("hybrid-static"):
        cache = None  # the decoder's own buffers get random states
    elif synthetic and engine.startswith("hybrid"):
        cache = synthetic_hybrid_cache(model, batch, context, device, dtype)
    else:
        cache = new_cache(model, engine, batch, context, args)
    if synthetic:
        if not engine.startswith("hybrid"):
            fill_kv(cache, model, batch, context, device, dtype)
        nxt = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    else:
        ids, mask = left_padded(torch.randint(1, model.config.vocab_size, (batch, context), device=device),
                                args.pad_fraction)  # fmt: skip
        if args.prefill_warmup:  # one untimed prefill of the same shapes: kernel compilation is not prefill time
            prefill(model, new_cache(model, engine, batch, context, args), ids, args.prefill_chunk, mask)
            sync(device)
            t = time.perf_counter()
        nxt = prefill(model, cache, ids, args.prefill_chunk, mask)[:, -1:].argmax(dim=-1)
    sync(device)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    step, state_bytes, step_name = decode_step(model, engine, cache, nxt, context, args, device)
    for _ in range(args.warmup):
        step()
    sync(device)
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = time.perf_counter() - t
    ms_step = 1000 * dt / args.steps
    gpu_ms, top = float("nan"), []
    if device.type == "cuda" and args.profile:
        try:
            gpu_ms, top = gpu_busy_ms(step, 4, device, args.kernels)
            gpu_ms = gpu_ms or float("nan")  # 0: kernels of a graph replay not traced
        except Exception:  # the profiler is a nicety: never lose the row for it
            pass
    return {
        "status": "ok",
        "tok_s": batch * args.steps / dt,
        "ms_step": ms_step,
        "gpu_ms": gpu_ms,
        "gpu_busy": gpu_ms / ms_step,
        "top_kernels": top,
        "state_mib_per_seq": state_bytes() / batch / 2**20,
        "step": step_name(),
        "prefill": "synthetic" if synthetic else "real",
        "pad_fraction": 0.0 if synthetic else args.pad_fraction,
        "prefill_s": prefill_s,
        "prefill_tok_s": float("nan") if synthetic else batch * context / prefill_s,
        "setup_s": setup_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_safely(model: Any, engine: str, batch: int, context: int, args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    """:func:`run_engine`, with an out-of-memory or any other error turned into the row's status."""
    row: dict[str, Any] = {"engine": engine, "batch": batch, "context": context}
    try:
        row.update(run_engine(model, engine, batch, context, args, device, dtype))
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as e:  # one engine's failure must not lose the others' rows
        row["status"] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        row["traceback"] = traceback.format_exc(limit=8)
    finally:
        if engine == "softmax-compiled":
            torch._dynamo.reset()
        free(device)
    return row


def row_line(row: dict[str, Any]) -> str:
    head = f"{row['engine']:>19} context {row['context']:>6} batch {row['batch']:>5}"
    if row["status"] != "ok":
        return f"{head} | {row['status']}"
    gpu = "" if math.isnan(row["gpu_ms"]) else f" GPU {row['gpu_ms']:.2f} ms ({row['gpu_busy']:.0%} busy)"
    gpu += f" | {row['step']} step" if row.get("step") else ""
    peak = "" if math.isnan(row["peak_gib"]) else f" | peak {row['peak_gib']:.1f} GiB"
    return (
        f"{head} | {row['tok_s']:>10.1f} tok/s {row['ms_step']:>8.2f} ms/step{gpu} | "
        f"{row['state_mib_per_seq']:>9.2f} MiB/seq | prefill {row['prefill']} {row['prefill_s']:.1f} s, "
        f"setup {row['setup_s']:.1f} s{peak}"
    ) + "".join(f"\n      {ms:8.3f} ms  {name}" for name, ms in row.get("top_kernels") or [])


def _num(x: float, fmt: str) -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def rich_table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for name in ("context", "batch", "engine", "tok/s", "ms/step", "GPU busy", "MiB/seq", "prefill s", "peak GiB"):
        table.add_column(name, justify="left" if name == "engine" else "right")
    for r in rows:
        if r["status"] != "ok":
            table.add_row(str(r["context"]), str(r["batch"]), r["engine"], f"[red]{r['status'][:60]}[/red]", *[""] * 5)
            continue
        table.add_row(
            str(r["context"]), str(r["batch"]), r["engine"] + (f" ({r['step']})" if r.get("step") else ""),
            f"{r['tok_s']:.1f}", f"{r['ms_step']:.2f}",
            _num(r["gpu_busy"], ".0%"), f"{r['state_mib_per_seq']:.2f}", f"{r['prefill_s']:.1f} ({r['prefill']})",
            _num(r["peak_gib"], ".1f"),
        )  # fmt: skip
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a real model: smollm2-135m, a local folder or a .gguf (default: random weights)")
    ap.add_argument("--preset", default="smollm2-135m", choices=list(PRESETS),
                    help="the shapes of the random-weight model (default: smollm2-135m)")
    ap.add_argument("--random-weights", action="store_true", help="random weights of --preset's shapes (the default "
                    "without --model; accepted for the issue's command line)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (random weights only)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths (default: by device)")
    ap.add_argument("--batch-sizes", "--batch-size", type=int, nargs="+", default=[1], dest="batch_sizes")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--search-max", action="store_true",
                    help="after the listed batch sizes, double hybrid-static's batch until it runs out of memory")
    ap.add_argument("--max-batch", type=int, default=65536, help="the largest batch --search-max tries")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps (the issue: 128)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--prefill", choices=("auto", "real", "synthetic"), default="auto")
    ap.add_argument("--real-prefill-max", type=int, default=262144,
                    help="--prefill auto: real prefill up to this many tokens (batch x context), synthetic above")
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill call")
    ap.add_argument("--pad-fraction", type=float, default=0.0,
                    help="real prefill: left-pad row b by fraction x context x b / (batch - 1) tokens (prompts of "
                         "different lengths; the softmax engines' decode steps then ignore the pads: speed only)")
    ap.add_argument("--prefill-warmup", action="store_true",
                    help="a real prefill runs once untimed first (its kernels compiled), then again timed")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiler's GPU kernel time")
    ap.add_argument("--kernels", type=int, default=0,
                    help="also record and print the N kernels that take the most GPU time per step (CUDA)")
    ap.add_argument("--cpu-compile-backend", default="eager", help="torch.compile backend of softmax-compiled off CUDA")
    ap.add_argument("--feature-map", default="hedgehog")
    ap.add_argument("--window", default="terrace")
    ap.add_argument("--window-size", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--decay", action="store_true", help="a per-head decay of the linear branch")
    ap.add_argument("--no-softmax", action="store_true", help="skip the softmax engines")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new row after this many seconds (the rows done are in the JSON already)")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default: benchmarks/results/)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = [e for e in args.engines if not (args.no_softmax and e.startswith("softmax"))]

    from rich.console import Console

    from lolcats_cli.core.model.convert import convert_model

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    contexts = args.contexts or ([1024, 4096, 16384] if device.type == "cuda" else [256, 1024])
    model = build_model(args, device, dtype)
    convert_model(model, feature_map=args.feature_map, window=args.window, decay=args.decay,
                  window_params={"size": args.window_size, "sinks": args.sinks}, mode="student")  # fmt: skip

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    what = args.model or args.preset + " shapes, random weights"
    title = (f"model: {what}, {model.config.num_hidden_layers} layers, {args.feature_map} + {args.window}"
             f"({args.window_size}, sinks {args.sinks}{', decay' if args.decay else ''}); {where}, "
             f"{str(dtype).removeprefix('torch.')}, {args.steps} timed steps")  # fmt: skip
    print(title, flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = (args.model or args.preset).replace("/", "_")
    path = args.json or RESULTS / f"generation-{name}-{device.type}-{stamp}.json"
    import transformers

    meta = {"title": title, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "device": where, "dtype": str(dtype), "torch": torch.__version__, "transformers": transformers.__version__,
            "started": stamp}  # fmt: skip
    rows: list[dict[str, Any]] = []
    began = time.perf_counter()

    def run(engine: str, batch: int, context: int) -> dict[str, Any] | None:
        if args.budget_s is not None and time.perf_counter() - began > args.budget_s:
            return None
        return record(run_safely(model, engine, batch, context, args, device, dtype))

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str) + "\n")

    def record(row: dict[str, Any]) -> dict[str, Any]:
        rows.append(row)
        print(row_line(row), flush=True)
        save()
        return row

    save()

    for context in contexts:
        for batch in args.batch_sizes:
            for engine in engines:
                run(engine, batch, context)
        if args.search_max and "hybrid-static" in engines:
            batch = max(args.batch_sizes) * 2
            while batch <= args.max_batch:
                row = run("hybrid-static", batch, context)
                if row is None or row["status"] != "ok":
                    break
                batch *= 2
    if args.budget_s is not None and time.perf_counter() - began > args.budget_s:
        print(f"stopped after --budget-s {args.budget_s:g}: rows not started are missing")
    Console(width=160).print(rich_table(rows, title))
    print(f"results: {path}")
    # On the H200 a process whose compiled decoder had been replaced by a later engine's ended with
    # std::bad_array_new_length or a segfault at exit; collecting before exit avoided it.
    free(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
