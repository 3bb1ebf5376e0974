"""An explicit decode cache for a converted model: :func:`make_cache` builds a :class:`LinearAttentionCache`.

Not required: converted layers adopt any empty dynamic transformers cache they are given (see
:mod:`.generation`). This module sits above :mod:`.convert` (it finds the converted layers) and
:mod:`.generation` (the cache layers), so neither imports the other through it.
"""

from __future__ import annotations

from typing import Any

from ...errors import ModelError
from ...hf_compat import Cache, CacheLayerMixin, DynamicCache, DynamicLayer
from ..model.linear_attention import linearized_layers
from .generation import HybridLayer


class LinearAttentionCache(Cache):
    """A transformers ``Cache`` with a :class:`~.generation.HybridLayer` per converted layer and a
    ``DynamicLayer`` per softmax layer; build one with :func:`make_cache`. Constant size per sequence for
    converted layers."""

    def __init__(self, layers: list[CacheLayerMixin]) -> None:
        super().__init__(layers=layers)


def make_cache(model: Any) -> LinearAttentionCache:
    """An empty :class:`LinearAttentionCache` for ``model``: a HybridLayer for each layer in student mode,
    and for every other layer what ``DynamicCache(config=...)`` would hold (a sliding-window layer where the
    model has one). Pass it as the cache (keyword :func:`~lolcats_cli.hf_compat.cache_kwarg`) to ``generate()``
    or ``forward``. ModelError when ``model`` has no converted layer."""
    converted = linearized_layers(model)
    if not converted:
        raise ModelError(f"{type(model).__name__} has no linearized layers", hint="call convert_model(model) first")
    students = {i for i, m in converted if m.mode == "student"}
    config = model.config.get_text_config(decoder=True)
    n = int(config.num_hidden_layers)
    layers = list(DynamicCache(config=config).layers)
    if len(layers) != n:  # a config transformers cannot lay out: plain full-attention layers
        layers = [DynamicLayer() for _ in range(n)]
    return LinearAttentionCache([HybridLayer() if i in students else layer for i, layer in enumerate(layers)])


__all__ = ["LinearAttentionCache", "make_cache"]
