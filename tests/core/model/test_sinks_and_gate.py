"""Sink keys and the gated linear branch, on tiny random models.

Sinks: the first ``sinks`` positions are in every later query's softmax window and never in the linear
branch, in every form of the op (naive, chunked, recurrent, padded). The gate: a per-head weight on the
linear branch that starts near 0, so the swapped, untrained model is the softmax over window + sinks,
which is exactly the "sink window" row ``lolcats eval`` reports.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lolcats_cli.api import window_masks  # noqa: E402
from lolcats_cli.builtins.feature_maps import Hedgehog  # noqa: E402
from lolcats_cli.builtins.windows import NoWindow, Sliding, Terrace  # noqa: E402
from lolcats_cli.core.eval.evaluate import sink_attention  # noqa: E402
from lolcats_cli.core.model.convert import (  # noqa: E402
    attention_parameters,
    attention_state_dict,
    freeze_for_transfer,
    linearized_layers,
    load_attention_state_dict,
    set_mode,
)
from lolcats_cli.core.model.registry import build_window  # noqa: E402
from lolcats_cli.errors import ConfigError  # noqa: E402
from lolcats_cli.kernels.chunked import hybrid_attention_chunked  # noqa: E402
from lolcats_cli.kernels.naive import hybrid_attention_naive  # noqa: E402
from lolcats_cli.testing import recurrent_form  # noqa: E402

from tiny_converted import converted_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _maps(H: int = 4, D: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    fq, fk = Hedgehog(H, D, Hedgehog.Params(feature_dim=8)), Hedgehog(H, D, Hedgehog.Params(feature_dim=8))
    with torch.no_grad():
        for p in [*fq.parameters(), *fk.parameters()]:
            p.normal_()
    return fq, fk


def test_sink_keys_are_in_every_window_and_never_linear() -> None:
    window = Sliding(Sliding.Params(size=4, sinks=2))
    pos = torch.arange(12)
    in_window, in_linear = window_masks(window, pos, pos)
    assert in_window[11].nonzero().flatten().tolist() == [0, 1, 8, 9, 10, 11]
    assert in_linear[11].nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7]
    assert not (in_window & in_linear).any()
    assert torch.equal(in_window | in_linear, pos[None] <= pos[:, None])  # together: every causal key
    assert not in_window[0, 1]  # a sink after the query stays invisible


@pytest.mark.parametrize("cls", [Sliding, Terrace, NoWindow])
@pytest.mark.parametrize("sinks", [1, 4, 13])
def test_sinks_agree_in_every_form_with_gradients(cls, sinks) -> None:
    window = cls(cls.Params(size=4, sinks=sinks))
    fq, fk = _maps()
    T = 63
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, T, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, T, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, T, 16, generator=gen, requires_grad=True)
    logits = torch.randn(4, generator=gen)
    ref = hybrid_attention_naive(q, k, v, fq, fk, logits, window)
    fast = hybrid_attention_chunked(q, k, v, fq, fk, logits, window, chunk_size=8)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g_fast = torch.autograd.grad(fast.square().sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # recurrent: a prefill shorter than the sinks, then steps of 1, 2, 3, ... tokens
        recurrent, state = recurrent_form(q, k, v, fq, fk, logits, window, prefill=2)
    torch.testing.assert_close(recurrent, ref, atol=1e-5, rtol=1e-5)
    assert state.k_sink is not None and state.k_sink.shape[2] == sinks
    torch.testing.assert_close(state.k_sink[:, :, : min(sinks, T)], k[:, :, :sinks].detach())


def test_sinks_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"window_params.sinks: must be an integer >= 0 \(got -1\)"):
        build_window("sliding", {"size": 64, "sinks": -1}, where="attention.window_params")
    assert build_window("terrace", {"size": 64}, where="w").sinks == 0  # the paper's method by default


def _converted(sinks: int, gate: bool, size: int = 8, seed: int = 0):
    return converted_model(sinks, gate, size, seed)


def test_untrained_gated_model_is_the_eval_sink_window_row() -> None:
    model = _converted(sinks=4, gate=True, size=8)
    ids = torch.randint(1, 128, (2, 96), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        student = model(ids, use_cache=False).logits
        set_mode(model, "teacher")
        with sink_attention(model, window=8, sinks=4):
            sink_row = model(ids, use_cache=False).logits
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(student, sink_row, atol=1e-5, rtol=1e-5)
    assert (student - full).abs().max() > 1e-2  # the sink window really differs from full softmax here
    # without the gate the linear branch weighs in from the start: the same model is not the sink window
    ungated = _converted(sinks=4, gate=False, size=8)
    with torch.no_grad():
        assert (ungated(ids, use_cache=False).logits - sink_row).abs().max() > 1e-2


def test_the_gate_trains_saves_and_reloads() -> None:
    model = _converted(sinks=2, gate=True)
    params = freeze_for_transfer(model)
    gates = [p for name, p in attention_parameters(model).items() if name.endswith("linear_logits")]
    assert len(gates) == 2 and all(any(g is p for p in params) for g in gates)
    set_mode(model, "transfer")
    ids = torch.randint(1, 128, (1, 48), generator=torch.Generator().manual_seed(6))
    model(ids, use_cache=False)
    loss = sum(m.transfer_loss for _, m in linearized_layers(model))
    loss.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)  # the gate can open

    with torch.no_grad():
        for g in gates:
            g.add_(1.0)
    saved = attention_state_dict(model)
    assert sum(name.endswith("linear_logits") for name in saved) == 2
    other = _converted(sinks=2, gate=True)  # the same base weights, the initial attention parameters
    set_mode(model, "student")
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        assert (other(ids, use_cache=False).logits - want).abs().max() > 1e-3  # the opened gates matter
        load_attention_state_dict(other, saved)
        torch.testing.assert_close(other(ids, use_cache=False).logits, want)
