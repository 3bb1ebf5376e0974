"""The conformance kit: the checks every feature map and window must pass, for plugin authors' own tests.

    from lolcats_cli.testing import check_feature_map, check_window

    def test_my_map():
        check_feature_map(MyMap)                      # default params
        check_feature_map(MyMap, {"feature_dim": 32}) # a mapping is validated like a recipe's

Each function runs every check on small, odd-sized random inputs (CPU, fp32 and bf16) and raises
:class:`ConformanceError` naming the first check that fails and the numbers; it returns the names of the
checks that passed. The three attention forms (naive, chunked, recurrent) must agree through the plugin:
that is what makes training (chunked), the reference (naive) and decoding (recurrent) one model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import copy
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .api import PLUGIN_API_VERSION, FeatureMap, PluginParams, Window
from .builtins.windows import NoWindow, Terrace
from .core.model.registry import build_params
from .errors import ConfigError, LolcatsError
from .kernels.chunked import hybrid_attention_chunked, hybrid_prefill
from .kernels.compare import rel_rms
from .kernels.naive import hybrid_attention_naive
from .kernels.recurrent import hybrid_step

FeatureFn = Callable[[Tensor], Tensor]

# Sizes: odd on purpose, so nothing divides evenly. H query heads share HKV key/value heads.
B, H, HKV, T, D = 3, 3, 1, 37, 13
EXACT = 1e-5  # rel-RMS for "the same computation, arranged differently"
FP32 = 1e-4  # rel-RMS between attention forms in fp32
BF16 = 5e-2  # rel-RMS of bf16 features against fp32 ones


class ConformanceError(LolcatsError):
    """A plugin broke the contract of :mod:`lolcats_cli.api`; ``check`` names the failed check."""

    def __init__(self, plugin: str, check: str, detail: str, hint: str | None = None) -> None:
        super().__init__(f"{plugin} fails conformance check {check!r}: {detail}", hint)
        self.plugin = plugin
        self.check = check


@contextlib.contextmanager
def _check(plugin: str, check: str, passed: list[str]) -> Iterator[None]:
    """Run one check: an exception inside becomes a ConformanceError naming the check (invalid params
    given to the kit stay a ConfigError: they are the caller's mistake, not the plugin's)."""
    try:
        yield
    except (ConformanceError, ConfigError):
        raise
    except Exception as exc:
        raise ConformanceError(plugin, check, f"raised {type(exc).__name__}: {exc}") from exc
    passed.append(check)


def _close(plugin: str, check: str, got: Tensor, want: Tensor, tol: float, what: str) -> None:
    if got.shape != want.shape:
        raise ConformanceError(plugin, check, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = rel_rms(got.float(), want.float())
    if not err <= tol:  # also catches NaN
        raise ConformanceError(plugin, check, f"{what}: relative RMS error {err:.3g} > {tol:g}")


def _finite(plugin: str, check: str, x: Tensor, what: str) -> None:
    bad = int((~torch.isfinite(x.detach())).sum())
    if bad:
        raise ConformanceError(plugin, check, f"{what}: {bad} of {x.numel()} values are NaN or infinite",
                               hint="keep the computation bounded (clamp, fp32 accumulation, a max shift)")


def _sign(fm: FeatureMap, plugin: str, check: str, fq: Tensor, fk: Tensor, what: str) -> None:
    """Non-negative features, or (``nonnegative = False``) strictly positive inner products."""
    fq, fk = fq.detach(), fk.detach()
    if type(fm).nonnegative:
        lo = float(torch.minimum(fq.min(), fk.min()))
        if lo < 0:
            n = int((fq < 0).sum() + (fk < 0).sum())
            raise ConformanceError(plugin, check, f"{what}: {n} negative features (min {lo:.3g})",
                                   hint="clamp or use a positive activation, or set nonnegative = False "
                                   "if every phi(q) . phi(k) is positive by construction")
        return
    dots = torch.einsum("bhnf,bhmf->bhnm", fq.float(), fk.float())
    lo = float(dots.min())
    if not lo > 0:
        raise ConformanceError(plugin, check, f"{what}: phi(q) . phi(k) reaches {lo:.3g}; it must stay > 0 "
                               "for a map with nonnegative = False", hint="the attention weights would go negative")


def _perturbed(fm: FeatureMap, seed: int) -> FeatureMap:
    """``fm`` with noise added to every parameter, so identity-like inits cannot hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fm.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return fm


def recurrent_form(q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, logits: Tensor,
                   window: Window, prefill: int) -> tuple[Tensor, Any]:
    """The recurrent form over a whole sequence: a prefill of ``prefill`` tokens, then steps of 1, 2, 3, ...
    tokens. q ``(B, H, T, D)``, k/v ``(B, Hkv, T, D)``; returns ``(B, H, T, Dv)`` and the final state."""
    T = q.shape[2]
    t = prefill
    out, state = hybrid_prefill(q[:, :, :t], k[:, :, :t], v[:, :, :t], phi_q, phi_k, logits, window)
    outs, step = [out], 1
    while t < T:
        s = slice(t, min(t + step, T))
        out, state = hybrid_step(q[:, :, s], k[:, :, s], v[:, :, s], phi_q, phi_k, logits, window, state)
        outs.append(out)
        t, step = s.stop, step + 1
    return torch.cat(outs, dim=2), state


def _agreement(plugin: str, check: str, phi_q: FeatureFn, phi_k: FeatureFn, window: Window, length: int) -> None:
    """naive == chunked == recurrent (prefill, then steps of 1, 2, 3, ... tokens) for one window."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, H, length, D, generator=gen)
    k, v = torch.randn(2, HKV, length, D, generator=gen), torch.randn(2, HKV, length, 7, generator=gen)
    logits = torch.randn(H, generator=gen)
    with torch.no_grad():
        ref = hybrid_attention_naive(q, k, v, phi_q, phi_k, logits, window)
        _finite(plugin, check, ref, f"naive attention with {window}")
        chunked = hybrid_attention_chunked(q, k, v, phi_q, phi_k, logits, window, chunk_size=5)
        _close(plugin, check, chunked, ref, FP32, f"chunked vs naive attention with {window}")
        recurrent, _ = recurrent_form(q, k, v, phi_q, phi_k, logits, window, prefill=length // 3)
        _close(plugin, check, recurrent, ref, FP32, f"recurrent vs naive attention with {window}")


def _params(cls: type, params: Mapping[str, Any] | PluginParams | None) -> PluginParams:
    return build_params(cls, params, where=f"{cls.__name__}.Params")


def check_feature_map(cls: type[FeatureMap], params: Mapping[str, Any] | PluginParams | None = None) -> list[str]:
    """Run every feature-map check on ``cls`` built with ``params``; return the names of the checks passed.

    Inputs are ``(B, H, T, D) = (3, 3, 37, 13)``; the output must be ``(B, H, T, feature_dim)``.
    """
    name, passed = cls.__name__, []
    with _check(name, "params", passed):
        p = _params(cls, params)
        torch.manual_seed(0)
        fm_q, fm_k = _perturbed(cls(H, D, p), seed=2), _perturbed(cls(H, D, p), seed=3)
    x, xk = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    with _check(name, "shape", passed):
        y = fm_q(x)
        want = (B, H, T, fm_q.feature_dim)
        if tuple(y.shape) != want:
            raise ConformanceError(name, "shape", f"output shape {tuple(y.shape)}, expected {want} "
                                   f"(B, H, T, feature_dim={fm_q.feature_dim})")
    with _check(name, "finite", passed):
        for scale in (1.0, 8.0):
            _finite(name, "finite", fm_q(scale * x), f"features of inputs with std {scale:g}")
    with _check(name, "sign", passed):
        for scale in (1.0, 8.0):
            _sign(fm_q, name, "sign", fm_q(scale * x), fm_k(scale * xk), f"inputs with std {scale:g}")
    with _check(name, "position-wise", passed):
        pieces = torch.cat([fm_q(x[:, :, :1]), fm_q(x[:, :, 1:8]), fm_q(x[:, :, 8:])], dim=2)
        _close(name, "position-wise", pieces, y, EXACT, "rows computed in separate calls")
        _close(name, "position-wise", fm_q(x.flip(2)).flip(2), y, EXACT, "rows computed in reverse order")
        _close(name, "position-wise", fm_q(x[1:2]), y[1:2], EXACT, "one batch row alone")
    with _check(name, "bf16", passed):
        for module in (fm_q, copy.deepcopy(fm_q).to(torch.bfloat16)):
            yb = module(x.bfloat16())
            _finite(name, "bf16", yb, "features of a bf16 input")
            _sign(fm_q, name, "bf16", yb, module(xk.bfloat16()), "bf16 inputs")
            _close(name, "bf16", yb, y, BF16, "bf16 features vs fp32 features")
    with _check(name, "state_dict", passed):
        fresh = cls(H, D, _params(cls, params))
        fresh.load_state_dict(fm_q.state_dict())
        if not torch.equal(fresh(x), y):
            raise ConformanceError(name, "state_dict", "a fresh instance loaded with state_dict() gives other "
                                   f"outputs (relative RMS {rel_rms(fresh(x), y):.3g})",
                                   hint="keep every learned tensor in a Parameter or a persistent buffer")
    with _check(name, "gradients", passed):
        params_ = [q for q in fm_q.parameters() if q.requires_grad]
        if params_:
            (fm_q(x).float() * torch.randn(want)).sum().backward()
            for pname, q in fm_q.named_parameters():
                if q.requires_grad and (q.grad is None or not torch.isfinite(q.grad).all()):
                    raise ConformanceError(name, "gradients", f"parameter {pname!r} gets no finite gradient")
    with _check(name, "attention forms", passed):
        for window in (Terrace(Terrace.Params(size=4)), NoWindow()):
            _agreement(name, "attention forms", fm_q, fm_k, window, T)
    return passed


def _elu1(x: Tensor) -> Tensor:
    return F.elu(x.float()) + 1.0


def check_window(cls: type[Window], params: Mapping[str, Any] | PluginParams | None = None) -> list[str]:
    """Run every window check on ``cls`` built with ``params``; return the names of the checks passed."""
    name, passed = cls.__name__, []
    with _check(name, "params", passed):
        window = cls(_params(cls, params))
        span = window.span
        if isinstance(span, bool) or not isinstance(span, int) or span < 0:
            raise ConformanceError(name, "params", f"span must be a non-negative int (got {span!r})")
    n = torch.arange(3 * span + 41)
    with _check(name, "start", passed):
        start = window.start(n)
        if start.shape != n.shape or start.dtype != torch.long:
            raise ConformanceError(name, "start", f"start(positions) gave {start.dtype} {tuple(start.shape)}; "
                                   f"expected torch.int64 {tuple(n.shape)}")
        drops = (start[1:] < start[:-1]).nonzero()
        if len(drops):
            i = int(drops[0])
            raise ConformanceError(name, "start", f"start decreases: start({i}) = {int(start[i])} > "
                                   f"start({i + 1}) = {int(start[i + 1])}", hint="a key that left the window "
                                   "must never come back")
        outside = ((start < n + 1 - span) | (start > n + 1)).nonzero()
        if len(outside):
            i = int(outside[0])
            raise ConformanceError(name, "start", f"start({i}) = {int(start[i])} is outside [{i + 1 - span}, "
                                   f"{i + 1}] (n + 1 - span, n + 1 with span={span})",
                                   hint="make span the largest number of keys any window holds")
    with _check(name, "deterministic", passed):
        again = [window.start(n), cls(_params(cls, params)).start(n), window.start(n.flip(0)).flip(0),
                 window.start(n.view(1, -1)).view(-1)]
        if not all(torch.equal(a, start) for a in again):
            raise ConformanceError(name, "deterministic", "start(positions) depends on more than each position "
                                   "(another call, instance, order or shape gave other values)")
    with _check(name, "attention forms", passed):
        _agreement(name, "attention forms", _elu1, _elu1, window, max(T, 2 * span + 13))
    if getattr(cls, "plugin_api_version", PLUGIN_API_VERSION) >= 2:  # sinks came with plugin API v2
        with _check(name, "sinks", passed):
            fields = {f.name for f in dataclasses.fields(cls.Params)}
            if "sinks" not in fields:
                raise ConformanceError(name, "sinks", f"{cls.Params.__name__} has no 'sinks' field",
                                       hint="derive the window's Params from lolcats_cli.api.WindowParams")
            given = dict(dataclasses.asdict(window.params), sinks=3)
            with_sinks = cls(_params(cls, given))
            if with_sinks.sinks != 3:
                raise ConformanceError(name, "sinks", f"built with sinks=3, the window reports sinks="
                                       f"{with_sinks.sinks}", hint="do not override Window.sinks")
            _agreement(name, "sinks", _elu1, _elu1, with_sinks, max(T, 2 * span + 13))
    return passed


__all__ = ["ConformanceError", "check_feature_map", "check_window", "recurrent_form"]
