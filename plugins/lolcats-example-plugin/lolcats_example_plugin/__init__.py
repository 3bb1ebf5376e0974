"""An example lolcats plugin: the softplus feature map, ``phi(x) = softplus(beta * x W) / beta``.

Copy this distribution to write your own: change the class, the entry point in pyproject.toml and the
names, keep the test that runs the conformance kit.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lolcats_cli.api import FeatureMap, FeatureMapParams

__version__ = "0.1.0"


@dataclasses.dataclass
class SoftplusParams(FeatureMapParams):
    """``feature_dim``: columns of W per head; ``beta``: sharpness (large beta approaches ReLU)."""

    feature_dim: int = 64
    beta: float = 1.0

    def errors(self) -> list[str]:
        # One message per problem, each starting with the field name; lolcats prefixes the key path.
        out = []
        if isinstance(self.feature_dim, bool) or not isinstance(self.feature_dim, int) or self.feature_dim <= 0:
            out.append(f"feature_dim must be a positive integer (got {self.feature_dim!r}); try 64")
        if not self.beta > 0:
            out.append(f"beta must be positive (got {self.beta!r}); 1.0 is the usual softplus")
        return out


class Softplus(FeatureMap):
    """``phi(x) = softplus(beta * x W) / beta``: smooth, strictly positive, never all-zero like ReLU.

    W ``(H, D, feature_dim)`` per head, initialised to a rectangular identity. Computes in fp32 and
    returns the input's dtype. ``(B, H, T, D) -> (B, H, T, feature_dim)``.
    """

    Params = SoftplusParams
    params: SoftplusParams
    plugin_api_version = 1  # the lolcats_cli.api.PLUGIN_API_VERSION this plugin was written for

    def __init__(self, num_heads: int, head_dim: int, params: SoftplusParams | None = None) -> None:
        super().__init__(num_heads, head_dim, params)
        eye = torch.eye(self.head_dim, self.params.feature_dim, dtype=torch.float32)
        self.weight = nn.Parameter(eye.unsqueeze(0).repeat(self.num_heads, 1, 1))  # (H, D, F)

    @property
    def feature_dim(self) -> int:
        return self.params.feature_dim

    def forward(self, x: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H, T, F)
        u = torch.einsum("bhtd,hdf->bhtf", x.float(), self.weight.float())
        return F.softplus(u, beta=self.params.beta).to(x.dtype)


__all__ = ["Softplus", "SoftplusParams"]
