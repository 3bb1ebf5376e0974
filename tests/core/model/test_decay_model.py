"""The learnable decay of the linear branch (``attention.decay``) in a converted model: heads start spread
over horizons of 64 to 4096 tokens, the decay trains (its gradient is not zero, and stage 1's optimizer
moves it), saves and reloads, and the model decodes with a cache (also left-padded) exactly as its full
forward computes."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lolcats_cli.core.model import convert as cv  # noqa: E402
from lolcats_cli.core.model.linear_attention import DECAY_HORIZONS, initial_log_horizons  # noqa: E402
from lolcats_cli.hf_compat import DynamicCache, cache_kwarg  # noqa: E402

from tiny_converted import converted_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _converted(decay: bool = True, seed: int = 0):
    model = converted_model(sinks=2, gate=True, size=4, seed=seed, decay=decay)
    with torch.no_grad():  # open the gate, and horizons short enough to matter at these lengths
        for name, p in cv.attention_parameters(model).items():
            if name.endswith("linear_logits"):
                p.add_(1.6)
            elif name.endswith("log_horizon"):
                p.copy_(torch.log(torch.tensor([2.0, 5.0, 12.0, 30.0])))
    return model


def test_initial_horizons_spread_from_64_to_4096_tokens() -> None:
    tau = initial_log_horizons(9).exp()
    assert math.isclose(tau[0].item(), DECAY_HORIZONS[0], rel_tol=1e-5)
    assert math.isclose(tau[-1].item(), DECAY_HORIZONS[1], rel_tol=1e-5)
    assert bool((tau[1:] > tau[:-1]).all())
    model = _converted()
    layer = cv.linearized_layers(model)[0][1]
    assert cv.describe(model)["decay"] is True and "decay=True" in repr(layer)
    d = layer.log_decay().exp()
    assert bool(((d > 0) & (d < 1)).all())


def test_decay_changes_the_model_and_off_is_the_paper_method() -> None:
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_decay = _converted(decay=True)(ids, use_cache=False).logits
        without = _converted(decay=False)(ids, use_cache=False).logits
    assert (with_decay - without).abs().max() > 1e-3
    assert "log_horizon" not in "".join(cv.attention_parameters(_converted(decay=False)))


def test_the_decay_trains_saves_and_reloads() -> None:
    model = _converted()
    params = cv.freeze_for_transfer(model)
    horizons = [p for name, p in cv.attention_parameters(model).items() if name.endswith("log_horizon")]
    assert len(horizons) == 2 and all(any(h is p for p in params) for h in horizons)
    cv.set_mode(model, "transfer")
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(6))
    model(ids, use_cache=False)
    sum(m.transfer_loss for _, m in cv.linearized_layers(model)).backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in horizons)
    before = [h.detach().clone() for h in horizons]
    torch.optim.Adam(horizons, lr=1e-2).step()  # stage 1's optimizer and lr move log tau by about lr per step
    assert all(0.005 < (h - b).abs().max() < 0.02 for h, b in zip(horizons, before))

    saved = cv.attention_state_dict(model)
    assert sum(name.endswith("log_horizon") for name in saved) == 2
    other = _converted()
    cv.set_mode(model, "student")
    with torch.no_grad():
        for h in horizons:
            h.add_(0.5)
        want = model(ids, use_cache=False).logits
        assert (other(ids, use_cache=False).logits - want).abs().max() > 1e-4
        cv.load_attention_state_dict(other, saved)
        torch.testing.assert_close(other(ids, use_cache=False).logits, want)


def test_cached_decoding_and_left_padding_match_the_full_forward() -> None:
    model = _converted()
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 is left-padded by 5 tokens
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # positions as generate() gives them: RoPE as for the row alone
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache, outs = DynamicCache(), []
        for a, b in [(0, 11), (11, 12), (12, 20), (20, 30)]:
            outs.append(model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], use_cache=True,
                              **{cache_kwarg(model): cache}).logits)  # fmt: skip
        alone = model(ids[1:, 5:], use_cache=False).logits
    stepped = torch.cat(outs, dim=1)
    torch.testing.assert_close(stepped[mask.bool()], full[mask.bool()], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full[1, 5:], alone[0], atol=1e-4, rtol=1e-4)
