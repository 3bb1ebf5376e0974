"""Inputs shared by the kernel tests: random q, k, v, window logits and learnable test feature maps."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn

from lolcats_cli.api import Window, WindowParams
from lolcats_cli.builtins.windows import NoWindow, Sliding, Terrace
from lolcats_cli.kernels.chunked import hybrid_prefill
from lolcats_cli.kernels.recurrent import hybrid_step

B, H, HKV, D, DV, F_HALF = 2, 4, 2, 16, 8, 8
FP32_TOL, BF16_TOL = 1e-5, 1e-2
# Gradients that are zero in theory (the window factor while no key is linear yet; q and k at T = 1 without
# a window) come out as rounding noise of about 1e-6, and the window-factor gradient is a long sum with
# cancellations: a gradient also passes when no element is off by GRAD_ATOL (gradients here are ~0.1 to 1).
GRAD_ATOL = 1e-5


# Small windows with and without sinks, and none, for the decay and delta-rule tests.
SMALL_WINDOWS: dict[str, Window] = {
    "sliding5": Sliding(WindowParams(size=5)),
    "terrace5-sinks2": Terrace(WindowParams(size=5, sinks=2)),
    "sliding16-sinks4": Sliding(WindowParams(size=16, sinks=4)),
    "none": NoWindow(),
}


class TwoSoftmaxMap(nn.Module):
    """Hedgehog-like test map with learnable W ``(H, D, F/2)``: ``[softmax(x W), softmax(-x W)]``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(H, D, F_HALF, generator=gen) * 0.5)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H, T, 2 * F_HALF)
        h = torch.einsum("bhtd,hdf->bhtf", x.float(), self.W)
        return torch.cat([h.softmax(dim=-1), (-h).softmax(dim=-1)], dim=-1)


def make_inputs(T: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random q ``(B, H, T, D)``, k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``, window logits and maps."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(B, H, T, D, generator=gen).to(dtype),
        k=torch.randn(B, HKV, T, D, generator=gen).to(dtype),
        v=torch.randn(B, HKV, T, DV, generator=gen).to(dtype),
        phi_q=TwoSoftmaxMap(seed + 1),
        phi_k=TwoSoftmaxMap(seed + 2),
        window_logits=torch.randn(H, generator=gen),
    )


def sliced(x: dict, a: int, b: int) -> dict:
    """The inputs for positions ``[a, b)``."""
    return {**x, "q": x["q"][:, :, a:b], "k": x["k"][:, :, a:b], "v": x["v"][:, :, a:b]}


def decode(x: dict, window: Window, cuts: list[int], log_decay: Tensor | None = None, prefill=hybrid_prefill,
           step=hybrid_step) -> Tensor:
    """Prefill ``[0, cuts[0])`` then one ``step`` per ``[cuts[i], cuts[i+1])``; the outputs joined."""
    y, state = prefill(**sliced(x, 0, cuts[0]), window=window, log_decay=log_decay)
    outs = [y]
    for a, b in pairwise(cuts):
        y, state = step(**sliced(x, a, b), window=window, state=state, log_decay=log_decay)
        outs.append(y)
    return torch.cat(outs, dim=2)
