"""Every registered plugin passes the conformance kit; the built-in maps are the functions they claim to
be; the kit catches broken plugins."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor, nn

from lolcats_cli.api import FeatureMap, Window
from lolcats_cli.builtins.feature_maps import Hedgehog, Taylor
from lolcats_cli.builtins.windows import Sliding
from lolcats_cli.core.model import registry
from lolcats_cli.testing import ConformanceError, check_feature_map, check_window

PLUGINS = registry.list_plugins()


@pytest.mark.parametrize("info", PLUGINS, ids=[f"{p.kind}:{p.name}" for p in PLUGINS])
def test_every_registered_plugin_conforms(info: registry.PluginInfo) -> None:
    cls = registry.load(info.kind, info.name)
    passed = check_feature_map(cls) if info.kind == "feature_map" else check_window(cls)
    assert "attention forms" in passed


@pytest.mark.parametrize("name, params", [("hedgehog", {"feature_dim": 7}), ("elu", {"feature_dim": 5}),
                                          ("t2r", {"feature_dim": 21}), ("taylor", {"proj_dim": 3})])
def test_builtin_maps_conform_with_other_params(name: str, params: dict) -> None:
    check_feature_map(registry.get_feature_map(name), params)


def test_small_windows_conform() -> None:
    for name in ("sliding", "terrace"):
        check_window(registry.get_window(name), {"size": 3})


def test_hedgehog_is_the_reference_function() -> None:
    H, D = 4, 16
    fm = Hedgehog(H, D)
    assert (fm.params.feature_dim, fm.params.eps, fm.feature_dim) == (64, 1e-12, 128)
    assert torch.equal(fm.weight.data, torch.eye(D, 64).expand(H, D, 64))  # rectangular identity, no bias
    assert [n for n, _ in fm.named_parameters()] == ["weight"]
    with torch.no_grad():
        fm.weight.normal_()
    x = torch.randn(2, H, 9, D)
    u = torch.einsum("bhtd,hdf->bhtf", x, fm.weight)
    want = torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1).clamp(min=1e-12)
    torch.testing.assert_close(fm(x), want, rtol=1e-6, atol=1e-7)


def test_taylor_inner_product_is_the_taylor_polynomial() -> None:
    fm = Taylor(2, 8, Taylor.Params(proj_dim=4))
    assert fm.feature_dim == 1 + 4 + 16
    q, k = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    qp, kp = (torch.einsum("bhtd,hdf->bhtf", t, fm.weight) for t in (q, k))
    s = torch.einsum("bhnf,bhmf->bhnm", qp, kp) / math.sqrt(4)
    dots = torch.einsum("bhnf,bhmf->bhnm", fm(q), fm(k))
    torch.testing.assert_close(dots, 1 + s + s * s / 2)


def test_elu_t2r_default_to_head_dim() -> None:
    for name in ("elu", "t2r"):
        assert registry.build_feature_map(name, 2, 24).feature_dim == 24
        assert registry.build_feature_map(name, 2, 24, {"feature_dim": 0}).feature_dim == 24


# ------------------------------------------------------------------------- the kit catches broken plugins


class _Linear(FeatureMap):
    """x W with nothing to keep it positive: negative features."""

    def __init__(self, num_heads: int, head_dim: int, params=None) -> None:
        super().__init__(num_heads, head_dim, params)
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))

    @property
    def feature_dim(self) -> int:
        return self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bhtd,hdf->bhtf", x.float(), self.weight.float()).to(x.dtype)


class _Exp(_Linear):
    """exp without a shift: infinite for large inputs."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(20 * super().forward(x).float())


class _MixesPositions(_Linear):
    """softmax over time: row t depends on every row."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(super().forward(x).float(), dim=-2)


class _ForgetsState(_Linear):
    """keeps a learned tensor outside the state_dict."""

    def __init__(self, num_heads: int, head_dim: int, params=None) -> None:
        super().__init__(num_heads, head_dim, params)
        self.offset = torch.rand(head_dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x).float()) + self.offset


class _WrongWidth(_Linear):
    @property
    def feature_dim(self) -> int:
        return self.head_dim + 1

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


class _Bf16Mismatch(_Linear):
    """multiplies the input by the weight in the input's dtype: fails for bf16 inputs."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(torch.einsum("bhtd,hdf->bhtf", x, self.weight))


@pytest.mark.parametrize("cls, check, words", [
    (_Linear, "sign", "negative features"),
    (_Exp, "finite", "NaN or infinite"),
    (_MixesPositions, "position-wise", "relative RMS error"),
    (_ForgetsState, "state_dict", "fresh instance"),
    (_WrongWidth, "shape", "expected (3, 3, 37, 14)"),
    (_Bf16Mismatch, "bf16", "raised RuntimeError"),
])
def test_kit_catches_broken_feature_maps(cls: type, check: str, words: str) -> None:
    with pytest.raises(ConformanceError) as err:
        check_feature_map(cls)
    assert err.value.check == check, err.value.message
    assert words in err.value.message and cls.__name__ in err.value.message


@dataclasses.dataclass
class _SizeParams(Window.Params):
    size: int = 4


class _Shrinking(Window):
    """start jumps back: a key would re-enter the window."""

    Params = _SizeParams

    @property
    def span(self) -> int:
        return 4

    def start(self, positions: Tensor) -> Tensor:
        return (positions - 3).clamp_min(0) - 2 * (positions % 5 == 0).long()


class _TooWide(Sliding):
    """claims a span smaller than its window."""

    @property
    def span(self) -> int:
        return self.params.size - 1


@pytest.mark.parametrize("cls, words", [(_Shrinking, "start decreases"), (_TooWide, "is outside")])
def test_kit_catches_broken_windows(cls: type, words: str) -> None:
    with pytest.raises(ConformanceError) as err:
        check_window(cls)
    assert err.value.check == "start" and words in err.value.message
