"""How far a half-precision linear state S drifts from fp32 over a long decode, with and without the decay.

One hybrid attention layer (random inputs; 4 query / 2 KV heads, head dim 64, the hedgehog map, 32 features,
terrace window 64 + 4 sinks, the linear branch weighted by a gate of sigmoid(-1)) decodes ``--steps`` tokens through
the static step (:func:`~lolcats_cli.kernels.static.static_step`, PyTorch) twice from the same inputs: S in fp32 and
S in ``--dtype``. Prints the relative RMS of the outputs' difference per range of positions. Without a decay S sums
every key, so each new block is a smaller part of it and more of it is rounded away in bf16; with a decay S stays
bounded. ``--bias`` adds a constant to the values (real values have non-zero means; S then grows linearly)::

    python benchmarks/state_drift.py --steps 16384 --bias 1 [--decay] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

B, H, HKV, D, F_HALF = 2, 4, 2, 64, 16


def _hedgehog(gen: torch.Generator):
    """The built-in hedgehog map with random weights (its identity initialisation would make every head alike)."""
    from lolcats_cli.builtins.feature_maps import Hedgehog, HedgehogParams

    phi = Hedgehog(H, D, HedgehogParams(feature_dim=F_HALF))
    with torch.no_grad():
        phi.weight.copy_(torch.randn(H, D, F_HALF, generator=gen) * 0.3)
    return phi


def decode(steps: int, bias: float, decay: bool, s_dtype: torch.dtype, seed: int = 7) -> Tensor:
    """The outputs ``(B, H, steps, D)`` of ``steps`` static steps from an empty state with S in ``s_dtype``."""
    from lolcats_cli.api import WindowParams
    from lolcats_cli.builtins.windows import Terrace
    from lolcats_cli.kernels.recurrent import HybridState
    from lolcats_cli.kernels.static import StaticState, fold_width, static_step

    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, steps, D, generator=gen), torch.randn(B, HKV, steps, D, generator=gen)
    v = torch.randn(B, HKV, steps, D, generator=gen) + bias
    phi_q, phi_k = _hedgehog(gen), _hedgehog(gen)
    window = Terrace(WindowParams(size=64, sinks=4))
    logits = torch.full((H,), -1.0)
    log_decay = -1.0 / torch.tensor([64.0, 256.0, 1024.0, 4096.0]) if decay else None
    empty = HybridState.empty(B, H, HKV, D, D, 2 * F_HALF, window.span, sinks=window.sinks)
    state, fold = StaticState.from_hybrid(empty, s_dtype=s_dtype), fold_width(window)
    with torch.no_grad():
        ys = [static_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], phi_q, phi_k, logits, window,
                          state, log_decay=log_decay, fold=fold) for t in range(steps)]  # fmt: skip
    return torch.cat(ys, dim=2)


def drift(steps: int, bias: float, decay: bool, s_dtype: torch.dtype) -> list[dict]:
    """Relative RMS of the ``s_dtype`` outputs against fp32's over doubling ranges of positions."""
    from lolcats_cli.kernels.compare import rel_rms

    want, got = decode(steps, bias, decay, torch.float32), decode(steps, bias, decay, s_dtype)
    edges = [0] + [e for e in (1024, 4096, 8192, 16384, 32768, 65536) if e < steps] + [steps]
    return [{"from": a, "to": b, "rel_rms": rel_rms(got[:, :, a:b], want[:, :, a:b])} for a, b in zip(edges, edges[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16384)
    ap.add_argument("--bias", type=float, default=1.0, help="added to every value (default 1)")
    ap.add_argument("--decay", action="store_true", help="per-head decays over 64 to 4096 tokens")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = drift(args.steps, args.bias, args.decay, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    print(f"S in {args.dtype} against fp32, {args.steps} steps, value bias {args.bias:g}, "
          f"{'decay' if args.decay else 'no decay'} ({time.perf_counter() - start:.0f} s):")
    for r in rows:
        print(f"  positions [{r['from']}, {r['to']}): output rel rms {r['rel_rms']:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
