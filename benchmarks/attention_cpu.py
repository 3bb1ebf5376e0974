"""Time and peak memory of the naive vs the chunked hybrid attention forward on CPU.

    python benchmarks/attention_cpu.py
    python benchmarks/attention_cpu.py --T 1024 4096 16384 --threads 2

Shapes: B=1, H=9 query heads, Hkv=3, head dim 64, a Hedgehog-like feature map (two softmaxes over 64
projections: 128 features), terrace window of 64, fp32, under ``torch.inference_mode``. Each (form, T) runs in
a fresh subprocess; its peak memory is the peak RSS (``ru_maxrss``) minus the RSS just before the first call,
with the inputs already built. Naive runs that would need more than ``--max-gb`` are skipped with an estimate.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import Tensor

from lolcats_cli.api import WindowParams
from lolcats_cli.builtins.windows import Terrace
from lolcats_cli.kernels import hybrid_attention_chunked, hybrid_attention_naive

B, H, HKV, D, F_HALF, WINDOW = 1, 9, 3, 64, 64, 64
FORMS = {"naive": hybrid_attention_naive, "chunked": hybrid_attention_chunked}
# Live (B, H, T, T) fp32 tensors at the naive form's peak (scores, window weights, linear weights and their
# sum), plus about four T x T boolean masks.
NAIVE_TxT_FP32, NAIVE_TxT_BOOL = 4, 4


def naive_estimate_gb(T: int) -> float:
    """Peak memory of the naive forward, from the count of its T x T tensors."""
    return (NAIVE_TxT_FP32 * B * H * 4 + NAIVE_TxT_BOOL) * T * T / 1e9


class HedgehogLike(torch.nn.Module):
    """``(B, H, T, D) -> (B, H, T, 128)``: ``[softmax(x W), softmax(-x W)]`` with W ``(H, D, 64)``."""

    def __init__(self) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(H, D, F_HALF) * D**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.einsum("bhtd,hdf->bhtf", x, self.W)
        return torch.cat([h.softmax(dim=-1), (-h).softmax(dim=-1)], dim=-1)


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc), or the peak so far where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def worker(form: str, T: int, repeats: int) -> dict[str, float]:
    """Run one (form, T) in this process: peak RSS delta of the first call; wall and CPU seconds of the
    fastest of ``repeats`` further calls (CPU time is the steadier number on a shared machine)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D)
    phi_q, phi_k, logits = HedgehogLike(), HedgehogLike(), torch.full((H,), -2.1972)
    window, fn = Terrace(WindowParams(size=WINDOW)), FORMS[form]

    def timed() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn(q, k, v, phi_q, phi_k, logits, window)
        return time.perf_counter() - wall, time.process_time() - cpu

    with torch.inference_mode():
        before = _rss_bytes()
        first = timed()
        peak = _peak_rss_bytes() - before
        wall, cpu = min([timed() for _ in range(repeats)], default=first)
    return {"time_s": wall, "cpu_s": cpu, "peak_mb": peak / 1e6}


def run_in_subprocess(form: str, T: int, threads: int, repeats: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", form, "--T", str(T), "--threads", str(threads)]
    out = subprocess.run(cmd + ["--repeats", str(repeats)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384], help="sequence lengths")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first (best is shown)")
    parser.add_argument("--max-gb", type=float, default=12.0, help="skip naive runs estimated above this")
    parser.add_argument("--worker", choices=list(FORMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.T[0], args.repeats)))
        return

    print(f"B={B} H={H} Hkv={HKV} D={D} F={2 * F_HALF} terrace({WINDOW}) fp32 forward, {args.threads} threads")
    print(f"{'form':<8} {'T':>6} {'wall (s)':>9} {'CPU (s)':>8} {'peak RSS delta (MB)':>20} {'x prev T':>9}")
    prev: dict[str, tuple[int, float]] = {}
    for form in FORMS:
        for T in args.T:
            if form == "naive" and naive_estimate_gb(T) > args.max_gb:
                print(f"{form:<8} {T:>6} skipped (would need ~{naive_estimate_gb(T):.0f} GB)")
                continue
            r = run_in_subprocess(form, T, args.threads, args.repeats)
            ratio = f"{r['peak_mb'] / prev[form][1]:.2f}" if form in prev else "-"
            times = f"{r['time_s']:>9.3f} {r['cpu_s']:>8.3f}"
            print(f"{form:<8} {T:>6} {times} {r['peak_mb']:>20.1f} {ratio:>9}", flush=True)
            prev[form] = (T, r["peak_mb"])


if __name__ == "__main__":
    main()
