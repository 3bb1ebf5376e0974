"""Every registered kernel, through the one Kernel signature, agrees with the naive reference in every form:
whole sequences, prefill then steps, and left-padded rows (each row as if alone), with sinks and GQA."""

from __future__ import annotations

import pytest
import torch

from lolcats_cli.api import WindowParams
from lolcats_cli.builtins.windows import Sliding, Terrace
from lolcats_cli.kernels import KERNELS, Kernel, hybrid_attention_naive

B, H, HKV, T, D = 3, 4, 2, 23, 8
TOL = dict(atol=1e-5, rtol=1e-5)
WINDOWS = {"terrace4-sinks2": Terrace(WindowParams(size=4, sinks=2)), "sliding5": Sliding(WindowParams(size=5))}

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed: int = 0) -> tuple:
    """q, k, v ``(B, H|Hkv, T, D)``, feature maps and window logits."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (H, HKV, HKV))
    W = torch.randn(D, 6, generator=gen)
    phi = lambda x: torch.cat([(x @ W).softmax(-1), (-x @ W).softmax(-1)], dim=-1)  # noqa: E731
    return q, k, v, phi, phi, torch.randn(H, generator=gen)


# every kernel that computes the op itself (the recall cache is an approximation: tests/kernels/test_recall.py)
EXACT = [name for name, kernel in KERNELS.items() if kernel.exact]


@pytest.mark.parametrize("window_name", list(WINDOWS))
@pytest.mark.parametrize("name", EXACT)
def test_every_form_of_every_kernel_matches_naive(name: str, window_name: str) -> None:
    kernel: Kernel = KERNELS[name]
    window = WINDOWS[window_name]
    q, k, v, phi_q, phi_k, logits = _inputs()
    ref = hybrid_attention_naive(q, k, v, phi_q, phi_k, logits, window)
    args = (phi_q, phi_k, logits, window)
    torch.testing.assert_close(kernel.attention(q, k, v, *args), ref, **TOL)

    y, state = kernel.prefill(q[:, :, :9], k[:, :, :9], v[:, :, :9], *args)
    outs = [y]
    for a, b in [(9, 10), (10, 16), (16, T)]:
        y, state = kernel.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], *args, state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=2), ref, **TOL)


@pytest.mark.parametrize("name", EXACT)
def test_left_padded_rows_match_each_row_alone(name: str) -> None:
    kernel, window = KERNELS[name], WINDOWS["terrace4-sinks2"]
    q, k, v, phi_q, phi_k, logits = _inputs(1)
    args = (phi_q, phi_k, logits, window)
    pads = torch.tensor([0, 3, 7])
    whole = kernel.attention(q, k, v, *args, pads=pads)
    y, state = kernel.prefill(q[:, :, :12], k[:, :, :12], v[:, :, :12], *args, pads=pads)
    y2, _ = kernel.step(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], *args, state, pads=pads)
    stepped = torch.cat([y, y2], dim=2)
    for b, p in enumerate(pads.tolist()):
        row = [x[b : b + 1, :, p:] for x in (q, k, v)]
        alone = hybrid_attention_naive(*row, *args)[0]
        torch.testing.assert_close(whole[b, :, p:], alone, **TOL)
        torch.testing.assert_close(stepped[b, :, p:], alone, **TOL)
        assert not whole[b, :, :p].any()  # pad rows of the output are 0


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_a_step_longer_than_step_chunk_goes_in_chunks_and_still_matches_naive(padded: bool, monkeypatch) -> None:
    """A step of more than step_chunk tokens (a prompt continued in chunks, a chat turn) is attended step_chunk at a
    time: set to 3 here, one step of 14 tokens runs 5 chunks and gives the naive reference's outputs."""
    from lolcats_cli.kernels import base

    kernel, window = KERNELS["chunked"], WINDOWS["terrace4-sinks2"]
    monkeypatch.setattr(kernel, "step_chunk", 3)
    q, k, v, phi_q, phi_k, logits = _inputs(2)
    args = (phi_q, phi_k, logits, window)
    pads = torch.tensor([0, 2, 5]) if padded else None
    calls: list[int] = []
    step = base.hybrid_step if not padded else base.padded_step

    def counted(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(a[0].shape[2])
        return step(*a, **kw)

    monkeypatch.setattr(base, "padded_step" if padded else "hybrid_step", counted)
    y, state = kernel.prefill(q[:, :, :9], k[:, :, :9], v[:, :, :9], *args, pads=pads)
    y2, state = kernel.step(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], *args, state, pads=pads)
    assert calls == [3, 3, 3, 3, 2] and state.length == T
    got = torch.cat([y, y2], dim=2)
    for b in range(B):
        p = 0 if pads is None else int(pads[b])
        alone = hybrid_attention_naive(*(x[b : b + 1, :, p:] for x in (q, k, v)), *args)[0]
        torch.testing.assert_close(got[b, :, p:], alone, **TOL)
