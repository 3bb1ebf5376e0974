"""The plugin surface of lolcats: feature maps and windows.

A *feature map* phi turns queries or keys into non-negative features for the linear-attention branch.
A *window* says which recent keys each query attends to with softmax; every older key goes through the
linear branch (docs/method.md section 1). Plugins subclass :class:`FeatureMap` or :class:`Window`, declare a
``Params`` dataclass of typed fields with defaults, and register the class under the entry-point group
``lolcats.feature_maps`` or ``lolcats.windows``. The built-ins are registered exactly the same way.

Bump :data:`PLUGIN_API_VERSION` on any change a plugin author must react to.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

PLUGIN_API_VERSION = 3
# Plugins written for these versions load. v2 added sink keys (``WindowParams.sinks``, ``Window.sinks``);
# a v1 window keeps working unchanged (its ``sinks`` is 0 unless its Params subclass WindowParams). v3 tells a
# feature map its role ("q" / "k") and layer (``role=``, ``layer_idx=`` to ``__init__`` when it accepts them, the
# attributes always) and calls its optional :meth:`FeatureMap.init_from_teacher`; v1 and v2 maps work unchanged.
COMPATIBLE_PLUGIN_APIS: frozenset[int] = frozenset({1, 2, 3})

FEATURE_MAP_GROUP = "lolcats.feature_maps"
WINDOW_GROUP = "lolcats.windows"


@dataclasses.dataclass
class PluginParams:
    """Base of every plugin's parameters: a dataclass of typed fields, each with a default.

    Override :meth:`errors` to add range checks; return one message per problem (never raise).
    """

    def errors(self) -> list[str]:
        return []


@dataclasses.dataclass
class FeatureMapParams(PluginParams):
    """Parameters common to feature maps (none yet); subclasses add their own fields."""


class FeatureMap(nn.Module):
    """phi: ``(B, H, T, D) -> (B, H, T, F)``.

    One instance maps either the queries or the keys of one layer (q and k get separate instances).
    ``num_heads`` is the number of *query* heads: keys of grouped-query models are expanded to the query
    heads before phi. Learnable parameters are ordinary ``nn.Parameter`` s and are trained in stage 1.

    Contract (checked by :func:`lolcats_cli.testing.check_feature_map`):

    * output shape ``(B, H, T, feature_dim)`` for input ``(B, H, T, head_dim)``, any B and T;
    * every output finite; non-negative when ``nonnegative`` is True. A map whose features may be
      negative (a Taylor expansion, say) sets ``nonnegative = False`` and must instead keep every inner
      product ``phi(q) . phi(k)`` strictly positive;
    * works position by position (row t of the output depends on row t of the input only), so the
      parallel and the recurrent forms of attention agree.

    ``role`` ("q" or "k") and ``layer_idx`` (the decoder layer, from 0) say what the instance maps; both are None
    for a map built outside a model (the conformance kit). Maps that must agree between q and k (random
    features) can seed from ``layer_idx``. :meth:`init_from_teacher` is called once at conversion, before any
    trained weights are loaded, with the layer's original attention module (its ``q_proj`` / ``k_proj`` ...):
    the place to calibrate from the teacher's weights.
    """

    Params: ClassVar[type[FeatureMapParams]] = FeatureMapParams
    nonnegative: ClassVar[bool] = True
    plugin_api_version: ClassVar[int] = PLUGIN_API_VERSION  # set it to the version you wrote against

    def __init__(self, num_heads: int, head_dim: int, params: FeatureMapParams | None = None, *,
                 role: str | None = None, layer_idx: int | None = None) -> None:
        super().__init__()
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        self.params = params if params is not None else self.Params()
        self.role = role
        self.layer_idx = layer_idx

    def init_from_teacher(self, attention: nn.Module) -> None:
        """Optional hook: called once per map at conversion with the original attention module of its layer
        (the teacher: ``attention.q_proj.weight`` and so on). The default does nothing."""

    @property
    def feature_dim(self) -> int:
        """F, the size of the last output dimension."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H, T, F)
        raise NotImplementedError


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass
class WindowParams(PluginParams):
    """``size``: the number of most recent keys (the query included) the softmax window covers.
    ``sinks``: the first ``sinks`` positions of a sequence are in the softmax window of every later query
    and never in the linear branch (attention sinks; 0 = none, the paper's method; 4 in shipped recipes)."""

    size: int = 64
    sinks: int = 0

    def errors(self) -> list[str]:
        out = []
        if not _is_int(self.size) or self.size <= 0:
            out.append(f"size must be a positive integer (got {self.size!r}); the paper uses 64")
        if not _is_int(self.sinks) or self.sinks < 0:
            out.append(f"sinks must be an integer >= 0 (got {self.sinks!r}); 4 is a good choice, 0 = none")
        return out


class Window:
    """Which keys each query sees through softmax: ``W(n) = [start(n), n]``; ``L(n) = [0, start(n))``.

    ``start`` must be non-decreasing in ``n``, with ``n + 1 - span <= start(n) <= n + 1``. A window is
    therefore a contiguous run of the most recent keys, at most ``span`` long; every key older than the
    window belongs to the linear branch, and once a key leaves the window it never comes back. That is
    what lets the chunked form look back only ``span`` keys and the recurrent form keep a buffer of
    ``span`` keys plus the linear state.

    Sinks (plugin API v2): the first :attr:`sinks` positions are also in every later query's window and
    never in the linear branch, so ``W(n) = [0, sinks) U [start(n), n]``. The kernels handle them from
    this attribute alone; a window plugin only has to accept the ``sinks`` parameter (inherit WindowParams).
    """

    Params: ClassVar[type[WindowParams]] = WindowParams
    plugin_api_version: ClassVar[int] = PLUGIN_API_VERSION  # set it to the version you wrote against

    def __init__(self, params: WindowParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @property
    def span(self) -> int:
        """The most keys any query's window holds (0 for pure linear attention)."""
        raise NotImplementedError

    def start(self, positions: Tensor) -> Tensor:
        """First window position for each query position; LongTensor of any shape -> same shape."""
        raise NotImplementedError

    @property
    def sinks(self) -> int:
        """How many leading positions are sink keys (``params.sinks``; 0 when the params have none)."""
        return int(getattr(self.params, "sinks", 0) or 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def window_masks(window: Window, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean masks ``(..., Tq, Tk)`` of the softmax window and of the linear branch.

    ``q_pos`` ``(..., Tq)`` and ``k_pos`` ``(..., Tk)`` are absolute positions. Keys after the query are in
    neither mask; sink keys (positions below ``window.sinks``) are in the window, never in the linear branch.
    """
    start = window.start(q_pos).unsqueeze(-1)  # (..., Tq, 1)
    kp = k_pos.unsqueeze(-2)  # (..., 1, Tk)
    qp = q_pos.unsqueeze(-1)
    causal = kp <= qp
    sink = (kp >= 0) & (kp < window.sinks)
    in_window = causal & ((kp >= start) | sink)
    in_linear = (kp < start) & ~sink
    return in_window, in_linear


__all__ = [
    "PLUGIN_API_VERSION",
    "COMPATIBLE_PLUGIN_APIS",
    "FEATURE_MAP_GROUP",
    "WINDOW_GROUP",
    "PluginParams",
    "FeatureMapParams",
    "FeatureMap",
    "WindowParams",
    "Window",
    "window_masks",
]
