"""Decode speed and cache memory against context length: a converted (hybrid) model vs the same model in softmax.

A benchmark, not a test: it prints a table. For each context length it prefills that many random tokens (in
chunks of ``--prefill-chunk``, through the cache, computing logits for the last position only), then times greedy decode steps of one token per sequence: wall time, and on a
GPU the kernel time per step (profiler), since a small model's wall time is mostly host-side launch
overhead. The hybrid model keeps a constant-size state per layer (``core/generation.py``); the softmax
baseline is the same weights in teacher mode with an ordinary growing KV cache. Examples:

    python benchmarks/generation.py                                   # SmolLM2-135M shapes, random weights
    python benchmarks/generation.py --preset llama-3.1-8b --device cuda   # Llama 3.1 8B shapes, random weights
    python benchmarks/generation.py --preset llama-3.1-8b --layers 2  # its first 2 layers (fits a laptop's RAM)
    python benchmarks/generation.py --model smollm2-135m              # the real embedded model
    python benchmarks/generation.py --device cuda --contexts 1024 8192 32768 --batch-size 8
    python benchmarks/generation.py --window sliding --window-size 64 --layers 4 --contexts 256 2048
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

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
        from lolcats_cli.core.models import load_model
        from lolcats_cli.core.recipe import Recipe, apply_overrides

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


def gpu_busy_ms(step: Callable[[], Any], n: int, device: torch.device) -> float:
    """Milliseconds of GPU kernel time per call of ``step`` (the profiler's sum over kernels), without the
    host-side launch overhead that dominates a small model's wall time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        sync(device)
    events = prof.key_averages()
    us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    return us / n / 1000


@torch.no_grad()
def prefill(model: Any, cache: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed ``ids`` ``(B, T)`` into ``cache`` in chunks of ``chunk`` tokens; the logits of the last position
    ``(B, 1, vocab)`` (every call computes the last position's logits only, not ``T x vocab``)."""
    from lolcats_cli.hf_compat import cache_kwarg, last_logits_kwargs

    if chunk < 1:
        raise SystemExit(f"--prefill-chunk {chunk}: must be at least 1")
    kwargs = {cache_kwarg(model): cache, "use_cache": True, **last_logits_kwargs(model)}
    for a in range(0, ids.shape[1], chunk):
        logits = model(ids[:, a : a + chunk], **kwargs).logits
    return logits[:, -1:]


@torch.no_grad()
def measure(model: Any, cache: Any, context: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Prefill ``context`` random tokens into ``cache``, then time ``args.steps`` greedy one-token steps."""
    from lolcats_cli.core.generation import state_nbytes
    from lolcats_cli.hf_compat import cache_kwarg

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch_size, context), device=device)
    t = time.perf_counter()
    logits = prefill(model, cache, ids, args.prefill_chunk)
    sync(device)
    prefill_s = time.perf_counter() - t
    nxt = logits[:, -1:].argmax(dim=-1)

    def step() -> None:
        nonlocal nxt
        nxt = model(nxt, **{cache_kwarg(model): cache}, use_cache=True).logits[:, -1:].argmax(dim=-1)

    for _ in range(args.warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = time.perf_counter() - t
    return {
        "tok_s": args.batch_size * args.steps / dt,
        "ms_step": 1000 * dt / args.steps,
        "gpu_ms": gpu_busy_ms(step, 4, device) if device.type == "cuda" else float("nan"),
        "mib": state_nbytes(cache) / 2**20,
        "prefill_s": prefill_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a real model: smollm2-135m, a local folder or a .gguf (default: random weights)")
    ap.add_argument("--preset", default="smollm2-135m", choices=list(PRESETS),
                    help="the shapes of the random-weight model (default: smollm2-135m)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (random weights only)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths (default: by device)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill call")
    ap.add_argument("--feature-map", default="hedgehog")
    ap.add_argument("--window", default="terrace")
    ap.add_argument("--window-size", type=int, default=64)
    ap.add_argument("--no-softmax", action="store_true", help="skip the softmax baseline")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    from lolcats_cli.core.convert import convert_model, set_mode
    from lolcats_cli.core.cache import make_cache

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    contexts = args.contexts or ([1024, 4096, 16384, 65536] if device.type == "cuda" else [256, 1024, 4096])
    model = build_model(args, device, dtype)
    convert_model(model, feature_map=args.feature_map, window=args.window,
                  window_params={"size": args.window_size}, mode="student")  # fmt: skip

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model: {args.model or args.preset + ' shapes, random weights'}, {model.config.num_hidden_layers} layers, "
          f"{args.feature_map} + {args.window}({args.window_size}); {where}, {str(dtype).removeprefix('torch.')}, "
          f"batch {args.batch_size}, {args.steps} timed steps")  # fmt: skip
    head = f"{'context':>8} | {'hybrid tok/s':>12} {'ms/step':>8} {'GPU ms':>7} {'state MiB':>10}"
    if not args.no_softmax:
        head += f" | {'softmax tok/s':>13} {'ms/step':>8} {'GPU ms':>7} {'KV MiB':>9} | {'KV / state':>10}"
    print(head)
    print("-" * len(head))
    for context in contexts:
        set_mode(model, "student")
        h = measure(model, make_cache(model), context, args, device)
        row = f"{context:>8} | {h['tok_s']:>12.1f} {h['ms_step']:>8.2f} {h['gpu_ms']:>7.2f} {h['mib']:>10.2f}"
        if not args.no_softmax:
            set_mode(model, "teacher")
            try:
                s = measure(model, DynamicCache(), context, args, device)
                row += f" | {s['tok_s']:>13.1f} {s['ms_step']:>8.2f} {s['gpu_ms']:>7.2f} {s['mib']:>9.1f}"
                ratio = f"{s['mib'] / h['mib']:>9.1f}x" if h["mib"] > 0 else f"{'n/a':>10}"  # an empty state
                row += f" | {ratio}"
            except torch.OutOfMemoryError:
                row += f" | {'out of memory':>13}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(row, flush=True)


if __name__ == "__main__":
    main()
