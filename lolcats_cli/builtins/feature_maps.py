"""Built-in feature maps: hedgehog (the default), elu, taylor and t2r. See docs/method.md section 2.

Every map holds its own per-head weights ``(H, D, F)`` (one instance for the queries, another for the keys),
keeps them in whatever dtype the module is cast to, and computes in fp32: the input and the weights are
upcast, the result is cast back to the input's dtype. So a bf16 model gets bf16 features computed with
fp32 accuracy, and fp32 master weights work unchanged. (Under CUDA autocast the PyTorch projection's einsum runs
in the autocast dtype; hedgehog's fused CUDA form, ``kernels/triton_featuremap.py``, keeps fp32 accuracy there too.)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import FeatureMap, FeatureMapParams
from ..kernels.triton_featuremap import fused_hedgehog, fused_hedgehog_enabled


def _identity_weight(num_heads: int, head_dim: int, feature_dim: int) -> nn.Parameter:
    """``(H, D, F)``: a rectangular identity ``eye(D, F)`` per head, in fp32."""
    eye = torch.eye(head_dim, feature_dim, dtype=torch.float32)
    return nn.Parameter(eye.unsqueeze(0).repeat(num_heads, 1, 1))


def _project(x: Tensor, weight: Tensor) -> Tensor:
    """``(B, H, T, D) x (H, D, F) -> (B, H, T, F)`` in fp32."""
    return torch.einsum("bhtd,hdf->bhtf", x.float(), weight.float())


def _positive_int_errors(name: str, value: object, allow_zero: bool = False) -> list[str]:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if ok:
        return []
    want = "a non-negative integer (0 = head_dim)" if allow_zero else "a positive integer"
    return [f"{name} must be {want} (got {value!r})"]


# --------------------------------------------------------------------------------------------- hedgehog


@dataclasses.dataclass
class HedgehogParams(FeatureMapParams):
    """``feature_dim``: columns of W per head (the output has twice as many); ``eps``: the clamp floor."""

    feature_dim: int = 64
    eps: float = 1e-12

    def errors(self) -> list[str]:
        out = _positive_int_errors("feature_dim", self.feature_dim)
        if not (isinstance(self.eps, float) and 0.0 < self.eps < 1.0):
            out.append(f"eps must be a float in (0, 1) (got {self.eps!r}); the reference uses 1e-12")
        return out


class Hedgehog(FeatureMap):
    """``phi(x) = cat([softmax(x W), softmax(-x W)], -1).clamp(min=eps)``, the reference's exact function.

    Two independent softmaxes over the feature dim; W ``(H, D, feature_dim)``, no bias, initialised to a
    rectangular identity per head. ``(B, H, T, D) -> (B, H, T, 2 * feature_dim)``.
    """

    Params = HedgehogParams
    params: HedgehogParams

    def __init__(self, num_heads: int, head_dim: int, params: HedgehogParams | None = None) -> None:
        super().__init__(num_heads, head_dim, params)
        self.weight = _identity_weight(self.num_heads, self.head_dim, self.params.feature_dim)

    @property
    def feature_dim(self) -> int:
        return 2 * self.params.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        if fused_hedgehog_enabled(x, self.weight):  # CUDA: one Triton kernel per direction, the same function
            return fused_hedgehog(x, self.weight, self.params.eps)
        return self.reference(x)

    def reference(self, x: Tensor) -> Tensor:
        """The PyTorch form: the CPU path, and what the fused kernels (kernels/triton_featuremap.py) must match."""
        u = _project(x, self.weight)  # (B, H, T, f)
        phi = torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)
        return phi.clamp(min=self.params.eps).to(x.dtype)


# ------------------------------------------------------------------------------------------- elu / t2r


@dataclasses.dataclass
class LinearMapParams(FeatureMapParams):
    """``feature_dim``: columns of W per head; None or 0 means ``head_dim`` (a square W)."""

    feature_dim: int | None = None

    def errors(self) -> list[str]:
        if self.feature_dim is None:
            return []
        return _positive_int_errors("feature_dim", self.feature_dim, allow_zero=True)


class _LinearMap(FeatureMap):
    """Shared body of elu and t2r: ``x W (+ b)`` per head with an identity-initialised W."""

    Params = LinearMapParams
    params: LinearMapParams

    def __init__(self, num_heads: int, head_dim: int, params: LinearMapParams | None = None) -> None:
        super().__init__(num_heads, head_dim, params)
        self.weight = _identity_weight(self.num_heads, self.head_dim, self.feature_dim)

    @property
    def feature_dim(self) -> int:
        return self.params.feature_dim or self.head_dim


class Elu(_LinearMap):
    """``phi(x) = 1 + elu(x W)`` (Katharopoulos et al.). ``(B, H, T, D) -> (B, H, T, feature_dim)``."""

    def forward(self, x: Tensor) -> Tensor:
        return (1.0 + F.elu(_project(x, self.weight))).to(x.dtype)


class T2R(_LinearMap):
    """``phi(x) = relu(x W + b)``; W identity-initialised, b ``(H, feature_dim)`` zeros.

    Features can be all zero for some rows: the attention kernels floor the denominator for that case.
    ``(B, H, T, D) -> (B, H, T, feature_dim)``.
    """

    def __init__(self, num_heads: int, head_dim: int, params: LinearMapParams | None = None) -> None:
        super().__init__(num_heads, head_dim, params)
        self.bias = nn.Parameter(torch.zeros(self.num_heads, self.feature_dim, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        u = _project(x, self.weight) + self.bias.float()[None, :, None, :]
        return torch.relu(u).to(x.dtype)


# --------------------------------------------------------------------------------------------- taylor


@dataclasses.dataclass
class TaylorParams(FeatureMapParams):
    """``proj_dim``: d', the size each head is projected to before the expansion (1 + d' + d'^2 features)."""

    proj_dim: int = 16

    def errors(self) -> list[str]:
        return _positive_int_errors("proj_dim", self.proj_dim)


class Taylor(FeatureMap):
    """2nd-order Taylor features of ``exp(q . k / sqrt(d'))`` (as in Based), over a learned projection.

    ``y = x P`` with P ``(H, D, d')`` initialised to a rectangular identity, then
    ``phi(y) = [1, y / d'^(1/4), vec(y y^T) / (sqrt(2) sqrt(d'))]`` so that
    ``phi(q) . phi(k) = 1 + s + s^2 / 2 = ((1 + s)^2 + 1) / 2 > 0`` with ``s = q' . k' / sqrt(d')``.
    Features can be negative (``nonnegative = False``); every inner product is at least 1/2.
    ``(B, H, T, D) -> (B, H, T, 1 + d' + d'^2)``.
    """

    Params = TaylorParams
    params: TaylorParams
    nonnegative = False

    def __init__(self, num_heads: int, head_dim: int, params: TaylorParams | None = None) -> None:
        super().__init__(num_heads, head_dim, params)
        self.weight = _identity_weight(self.num_heads, self.head_dim, self.params.proj_dim)

    @property
    def feature_dim(self) -> int:
        p = self.params.proj_dim
        return 1 + p + p * p

    def forward(self, x: Tensor) -> Tensor:
        p = self.params.proj_dim
        y = _project(x, self.weight)  # (B, H, T, p)
        outer = (y.unsqueeze(-1) * y.unsqueeze(-2)).flatten(-2)  # (B, H, T, p * p)
        phi = torch.cat(
            [torch.ones_like(y[..., :1]), y / p**0.25, outer / (math.sqrt(2.0) * math.sqrt(p))], dim=-1
        )
        return phi.to(x.dtype)


__all__ = ["Hedgehog", "HedgehogParams", "Elu", "T2R", "LinearMapParams", "Taylor", "TaylorParams"]
