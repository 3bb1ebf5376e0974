"""Forward and forward+backward time and peak memory of hybrid attention on one CUDA GPU, against softmax SDPA.

    python benchmarks/attention_gpu.py                       # Llama-3-8B and SmolLM2 shapes, 16K tokens per call
    python benchmarks/attention_gpu.py --shapes llama --lengths 4096 --reps 20

Per shape and sequence length N (batch = tokens // N: N=1024 B16, N=4096 B4, N=16384 B1), in one process:

* ``sdpa``: ``scaled_dot_product_attention``, causal, flash backend, bf16 (GQA through ``enable_gqa``, else
  the keys and values repeated, as transformers does);
* ``chunked``: the chunked PyTorch kernel (``lolcats_cli.kernels.chunked``) under bf16 autocast;
* ``triton`` and ``triton+decay``: the fused Triton kernel (``lolcats_cli.kernels.triton_hybrid``), bf16 inputs;
* ``delta``: the delta-rule state (PyTorch, no fused kernel);
* ``fla-linear`` and ``fla-simple-gla``, when ``import fla`` works (flash-linear-attention, else a note is
  printed and they are skipped): fla's chunked Triton kernels for linear attention alone, no sliding window, as
  a speed floor. ``fla-linear`` is ``fla.ops.linear_attn.chunk_linear_attn`` (normalized, like the hybrid's
  linear term); ``fla-simple-gla`` is ``fla.ops.simple_gla.chunk_simple_gla`` with the per-head decay as
  ``g_gamma`` (unnormalized; fla gives ``g_gamma`` no gradient). Both run on the same feature-mapped q and k
  (computed inside the timed call, as for the hybrid forms) in fla's ``(B, T, H, F)`` layout, v ``(B, T, H, D)``,
  bf16, with K and V repeated to the query heads (fla has no GQA).

The hybrid forms run the recipes' layer: terrace window 64 with 4 sinks, the built-in Hedgehog map with
learnable fp32 weights (128 features; on CUDA its fused Triton form unless ``LOLCATS_TRITON_MAP=0``) computed
inside the timed call, gradients into q, k, v, both maps'
weights, the window logits (and the decay). Times are CUDA-event medians after warm-up; "peak GiB" is the
peak allocated during the call above what was allocated before it (inputs excluded). Then, at full size, the
triton kernel is checked against the chunked one in fp32 (tight) and in bf16 (vs the chunked form in fp32 on
the same rounded inputs): max abs error and relative RMS of the output and of every gradient.

Every section is guarded: an error is printed and recorded, and the run goes on. Results go to
``benchmarks/results/attention-gpu-<gpu>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lolcats_cli.api import WindowParams
from lolcats_cli.builtins.feature_maps import Hedgehog, HedgehogParams
from lolcats_cli.builtins.windows import Terrace
from lolcats_cli.kernels import KERNELS
from lolcats_cli.kernels.delta import DeltaKernel, DeltaKeys
from profiling import print_kernels

SHAPES = {  # name: (query heads, KV heads, head dim)
    "llama": (32, 8, 128),  # Llama-3-8B attention
    "smollm2": (9, 3, 64),  # SmolLM2-135M attention
}
F_HALF = 64  # Hedgehog feature_dim 64 of the recipes: 128 features
WINDOW = Terrace(WindowParams(size=64, sinks=4))
FLA_METHODS = ["fla-linear", "fla-simple-gla"]  # flash-linear-attention's kernels, run only when it imports
METHODS = ["sdpa", "chunked", "triton", "triton+decay", "delta", *FLA_METHODS]
GiB = 2**30
DEVICE = "cuda"


def hedgehog(H: int, D: int, device: torch.device) -> Hedgehog:
    """The recipes' map, ``(B, H, T, D) -> (B, H, T, 128)`` (on CUDA the fused Triton map unless
    ``LOLCATS_TRITON_MAP=0``), its fp32 weight ``(H, D, 64)`` random rather than the identity start."""
    fm = Hedgehog(H, D, HedgehogParams(feature_dim=F_HALF)).to(device)
    with torch.no_grad():
        fm.weight.copy_(torch.randn(H, D, F_HALF, device=device) * D**-0.5)
    return fm


def make_inputs(shape: str, B: int, N: int, dtype: torch.dtype, seed: int = 0) -> dict:
    H, Hkv, D = SHAPES[shape]
    dev = torch.device(DEVICE)
    torch.manual_seed(seed)
    q = torch.randn(B, H, N, D, device=dev).to(dtype)
    k = torch.randn(B, Hkv, N, D, device=dev).to(dtype)
    v = torch.randn(B, Hkv, N, D, device=dev).to(dtype)
    return {
        "q": q, "k": k, "v": v, "phi_q": hedgehog(H, D, dev), "phi_k": hedgehog(H, D, dev),
        "window_logits": torch.full((H,), -2.1972, device=dev),  # sigmoid = 0.1, the paper's start
        "log_decay": -1.0 / torch.logspace(math.log10(64), math.log10(4096), H, device=dev),
        "beta_weight": torch.zeros(H, D, device=dev),  # the delta rule's write strength: sigmoid(k . w) = 0.5
    }  # fmt: skip


def fla_status() -> str | None:
    """None when flash-linear-attention imports (with the ops the fla rows call), else why not."""
    try:
        import fla.ops.linear_attn  # noqa: F401
        import fla.ops.simple_gla  # noqa: F401
    except Exception as e:  # noqa: BLE001 (not installed, or broken against this torch / triton)
        return f"{type(e).__name__}: {e}"
    return None


def fla_inputs(x: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Feature-mapped q and k ``(B, T, H, F)`` and v ``(B, T, H, D)``, bf16, in fla's layout (sequence before
    heads; fla removed ``head_first``). fla's linear attention has no GQA: it takes one key and value head per
    query head, so K and V are repeated to the query heads first (``repeat_interleave``, as transformers does);
    the feature map then runs on every query head, as in the hybrid kernels."""
    q, k, v = x["q"], x["k"], x["v"]
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    fq, fk = x["phi_q"](q), x["phi_k"](k)  # (B, H, T, F) in q's dtype
    bf16 = torch.bfloat16
    return fq.transpose(1, 2).to(bf16), fk.transpose(1, 2).to(bf16), v.transpose(1, 2).to(bf16)


def fla_call(method: str, x: dict) -> Tensor:
    """One forward of an fla row; returns ``(B, H, T, D)`` like the other methods. ``scale=1``: the feature
    maps' dot products are used as they are (as in the hybrid's linear term)."""
    fq, fk, v = fla_inputs(x)
    if method == "fla-linear":
        from fla.ops.linear_attn import chunk_linear_attn

        y, _ = chunk_linear_attn(fq, fk, v, scale=1.0, normalize=True, output_final_state=False)
    else:
        from fla.ops.simple_gla import chunk_simple_gla

        # g_gamma (H,): log of the per-step decay, data-independent, the same as our log_decay (natural log)
        y, _ = chunk_simple_gla(fq, fk, v, g_gamma=x["log_decay"].float(), scale=1.0, output_final_state=False)
    return y.transpose(1, 2)


def leaves(x: dict, method: str) -> list[Tensor]:
    """The tensors that get gradients (as stage 1 trains them)."""
    out = [x["q"], x["k"], x["v"]]
    if method in FLA_METHODS:  # no window; fla's g_gamma takes no gradient
        return out + [x["phi_q"].weight, x["phi_k"].weight]
    if method != "sdpa":
        out += [x["phi_q"].weight, x["phi_k"].weight, x["window_logits"]]
    if method in ("triton+decay", "delta"):
        out.append(x["log_decay"])
    if method == "delta":
        out.append(x["beta_weight"])
    return out


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except (RuntimeError, TypeError):  # no GQA in this backend / version: repeat K and V
            G = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def call(method: str, x: dict) -> Tensor:
    """One forward of ``method`` on inputs ``x``."""
    if method == "sdpa":
        return sdpa(x["q"], x["k"], x["v"])
    if method in FLA_METHODS:
        return fla_call(method, x)
    args = (x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], x["window_logits"], WINDOW)
    if method == "chunked":
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return KERNELS["chunked"].sequence(*args)
    if method == "delta":
        w = x["beta_weight"]
        keys = DeltaKeys(x["phi_k"], lambda k: torch.sigmoid(torch.einsum("bhtd,hd->bht", k.float(), w)))
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return DeltaKernel().sequence(*args[:4], keys, *args[5:], log_decay=x["log_decay"])
    ld = x["log_decay"] if method == "triton+decay" else None
    return KERNELS["triton"].sequence(*args, log_decay=ld)


def measure(fn: Callable[[], None], reps: int, warmup: int) -> tuple[float, float]:
    """Median ms of ``fn`` over ``reps`` CUDA-event timings after ``warmup`` calls, and the peak GiB it
    allocates above what was allocated before (one extra call, alone)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GiB
    times.sort()
    return times[len(times) // 2], peak


def bench_one(method: str, shape: str, B: int, N: int, reps: int, warmup: int, kernels: int = 0) -> dict:
    x = make_inputs(shape, B, N, torch.bfloat16)
    grads = leaves(x, method)
    for t in grads:
        t.requires_grad_(True)
    dy = torch.randn(B, SHAPES[shape][0], N, SHAPES[shape][2], device=DEVICE, dtype=torch.bfloat16)

    def forward() -> None:
        with torch.no_grad():
            call(method, x)

    def forward_backward() -> None:
        y = call(method, x)
        torch.autograd.backward(y, dy.to(y.dtype))
        for t in grads:
            t.grad = None

    fwd_ms, fwd_gib = measure(forward, reps, warmup)
    fb_ms, fb_gib = measure(forward_backward, reps, warmup)
    out = {"forward_ms": fwd_ms, "forward_peak_gib": fwd_gib, "fwd_bwd_ms": fb_ms, "fwd_bwd_peak_gib": fb_gib}
    if kernels:  # where the forward + backward's time goes
        from profiling import gpu_busy_ms

        out["fwd_bwd_busy_ms"], out["top_kernels"] = gpu_busy_ms(forward_backward, 3, torch.device(DEVICE), kernels)
    return out


def values_and_grads(method: str, x: dict, dy: Tensor, decay: bool) -> dict[str, Tensor]:
    names = ["q", "k", "v", "phi_q.weight", "phi_k.weight", "window_logits"] + (["log_decay"] if decay else [])
    ts = [x["q"], x["k"], x["v"], x["phi_q"].weight, x["phi_k"].weight, x["window_logits"]] + ([x["log_decay"]] if decay else [])
    for t in ts:
        t.requires_grad_(True)
        t.grad = None
    args = (x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], x["window_logits"], WINDOW)
    ld = x["log_decay"] if decay else None
    y = KERNELS[method].sequence(*args, log_decay=ld)
    out = {"y": y.detach().float()}
    grads = torch.autograd.grad(y, ts, dy.to(y.dtype))
    out.update({f"d {n}": g.detach().float() for n, g in zip(names, grads)})
    return out


def agreement(shape: str, B: int, N: int, dtype: torch.dtype, decay: bool) -> dict:
    """triton (inputs in ``dtype``) against chunked in fp32 on the same (rounded) inputs, at full size."""
    x = make_inputs(shape, B, N, dtype, seed=1)
    dy = torch.randn(B, SHAPES[shape][0], N, SHAPES[shape][2], device=DEVICE)
    got = values_and_grads("triton", x, dy.to(dtype), decay)
    x32 = dict(x, q=x["q"].detach().float(), k=x["k"].detach().float(), v=x["v"].detach().float())
    ref = values_and_grads("chunked", x32, dy.to(dtype).float(), decay)
    rows = {}
    for name, r in ref.items():
        g = got[name]
        err = (g - r).abs().max().item()
        rel = ((g - r).double().pow(2).mean().sqrt() / r.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()
        rows[name] = {"max_abs": err, "rel_rms": rel, "ref_max_abs": r.abs().max().item()}
    return rows


def run_cell(spec: dict) -> dict:
    """One section: ``{"kind": "time", shape, N, B, method, reps, warmup}`` or ``{"kind": "check", shape, N, B,
    dtype, decay}``."""
    if spec["kind"] == "time":
        return bench_one(spec["method"], spec["shape"], spec["B"], spec["N"], spec["reps"], spec["warmup"],
                         spec.get("kernels", 0))
    return agreement(spec["shape"], spec["B"], spec["N"], getattr(torch, spec["dtype"]), spec["decay"])


def run_isolated(spec: dict) -> dict:
    """:func:`run_cell` in a fresh Python process (a crash there loses that section only)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"subprocess exited {done.returncode}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


FATAL = ("CUDA error", "illegal memory access", "illegal instruction", "unspecified launch failure")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="sequence lengths N")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per call: batch = tokens // N")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kernels", type=int, default=0,
                        help="also profile each forward+backward and print its N most expensive kernels")
    parser.add_argument("--no-check", action="store_true", help="skip the triton vs chunked agreement check")
    parser.add_argument("--isolate", action="store_true",
                        help="run every section in its own process (after a CUDA crash; slower start-up)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_gpu.py needs a CUDA GPU (benchmarks/attention_cpu.py is the CPU one)")
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return

    gpu = torch.cuda.get_device_name()
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_version = f"not importable: {e!r}"
    fla_error = fla_status() if any(m in FLA_METHODS for m in args.methods) else "not asked for"
    if fla_error is None:
        import fla

        fla_version = getattr(fla, "__version__", "unknown")
    else:
        fla_version = f"not importable: {fla_error}"
        skipped = [m for m in args.methods if m in FLA_METHODS]
        if skipped:
            print(f"note: flash-linear-attention is not importable ({fla_error}): skipping {', '.join(skipped)}",
                  flush=True)
            args.methods = [m for m in args.methods if m not in FLA_METHODS]
    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
           "python": platform.python_version(), "fla": fla_version, "window": repr(WINDOW), "features": 2 * F_HALF,
           "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    results: dict = {"env": env, "timings": [], "agreement": [], "errors": []}
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = args.out or Path(__file__).resolve().parent / "results" / f"attention-gpu-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {"dead": False}

    def save() -> None:
        out.write_text(json.dumps(results, indent=1) + "\n")

    def guarded(what: str, spec: dict) -> dict | None:
        """The section's result, or None after printing and recording its error (the run goes on)."""
        if state["dead"]:
            results["errors"].append(f"{what}: skipped (the CUDA context was lost earlier)")
            return None
        try:
            return run_isolated(spec) if args.isolate else run_cell(spec)
        except Exception as e:  # noqa: BLE001 (one failing section must not lose the others)
            msg = f"{what}: {type(e).__name__}: {e}"
            print(f"  ERROR {msg}\n" + "".join(traceback.format_exc(limit=8)), flush=True)
            results["errors"].append(msg)
            if not args.isolate and any(f in str(e) for f in FATAL):
                state["dead"] = True
                print("  the CUDA context is lost: the remaining sections are skipped; rerun with --isolate",
                      flush=True)
            return None
        finally:
            save()
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass

    head = f"{'shape':<8} {'N':>6} {'B':>3} {'method':<14} {'fwd ms':>8} {'fwd GiB':>8} {'f+b ms':>8} {'f+b GiB':>8}"
    for shape in args.shapes:
        H, Hkv, D = SHAPES[shape]
        print(f"\n{shape}: {H} q / {Hkv} kv heads, D={D}, F={2 * F_HALF}, {args.tokens} tokens per call")
        print(head + f" {'fwd/sdpa':>9} {'f+b/sdpa':>9}", flush=True)
        for N in args.lengths:
            B = max(1, args.tokens // N)
            base = None
            for method in args.methods:
                spec = {"kind": "time", "shape": shape, "N": N, "B": B, "method": method, "reps": args.reps,
                        "warmup": args.warmup, "kernels": args.kernels}  # fmt: skip
                r = guarded(f"{shape} N={N} {method}", spec)
                if r is None:
                    continue
                if method == "sdpa":
                    base = r
                ratios = {}
                if base is not None:
                    ratios = {"fwd_vs_sdpa": r["forward_ms"] / base["forward_ms"],
                              "fwd_bwd_vs_sdpa": r["fwd_bwd_ms"] / base["fwd_bwd_ms"]}  # fmt: skip
                results["timings"].append({"shape": shape, "N": N, "B": B, "method": method, **r, **ratios})
                save()
                ratio_txt = (f" {ratios['fwd_vs_sdpa']:>8.2f}x {ratios['fwd_bwd_vs_sdpa']:>8.2f}x" if ratios else "")
                print(f"{shape:<8} {N:>6} {B:>3} {method:<14} {r['forward_ms']:>8.2f} {r['forward_peak_gib']:>8.2f} "
                      f"{r['fwd_bwd_ms']:>8.2f} {r['fwd_bwd_peak_gib']:>8.2f}" + ratio_txt, flush=True)
                if r.get("top_kernels"):
                    print(f"      f+b GPU busy {r['fwd_bwd_busy_ms']:.2f} ms:")
                    print_kernels(r["top_kernels"])

    if not args.no_check:
        print("\nagreement at full size: triton vs chunked in fp32 on the same inputs (max abs error / relative RMS)")
        for shape in args.shapes:
            for N in args.lengths:
                B = max(1, args.tokens // N)
                for dtype in ("float32", "bfloat16"):
                    for decay in (False, True):
                        label = f"{shape} N={N} B={B} {dtype} {'decay' if decay else 'no decay'}"
                        spec = {"kind": "check", "shape": shape, "N": N, "B": B, "dtype": dtype, "decay": decay}
                        rows = guarded(f"agreement {label}", spec)
                        if rows is None:
                            continue
                        results["agreement"].append({**spec, "errors": rows})
                        save()
                        worst = max(e["rel_rms"] for e in rows.values())
                        detail = "  ".join(f"{n} {e['max_abs']:.1e}/{e['rel_rms']:.1e}" for n, e in rows.items())
                        print(f"  {label}: worst rel RMS {worst:.1e}\n    {detail}", flush=True)

    save()
    print(f"\n{len(results['errors'])} errors; results in {out}")


if __name__ == "__main__":
    main()
