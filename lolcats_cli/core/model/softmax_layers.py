"""``attention.softmax_layers``: layers kept as ordinary softmax attention after stage 1.

Stage 1 trains every converted layer (each on exact teacher inputs, so the layers do not depend on each other).
``"auto:K"`` then keeps as softmax the K layers whose attention transfer left the highest held-out MSE, read from
the transfer run's ``metrics.json``; a list names them directly. Every later step (finetune, eval, chat, export)
builds the model with those layers unconverted: the original attention module, whose KV cache grows with the
context, while every other layer keeps its constant-size state. A finetune run records the resolved list, so
it never needs the transfer run's metrics again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..runs.rundir import METRICS

AUTO = re.compile(r"auto:(\d+)")


def check_softmax_layers(value: Any, layers: Any) -> list[str]:
    """Recipe problems of ``attention.softmax_layers`` (given ``attention.layers``), as messages."""
    if value is None:
        return []
    if isinstance(value, str):
        match = AUTO.fullmatch(value.strip())
        if match is None or int(match.group(1)) < 1:
            return [f"attention.softmax_layers: {value!r} is not auto:K with K >= 1, a list of layers, or null "
                    "(e.g. auto:2 keeps the 2 layers with the highest attention-transfer MSE as softmax)"]
        return []
    bad = [i for i in value if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    if bad or len(set(value)) != len(value):
        return [f"attention.softmax_layers: {value} must be distinct layer indices >= 0"]
    if isinstance(layers, list) and (outside := sorted(set(value) - set(layers))):
        return [f"attention.softmax_layers: {outside} are not converted layers (attention.layers={layers})"]
    return []


def auto_count(value: Any) -> int | None:
    """K of ``"auto:K"``; None for a list or None."""
    match = AUTO.fullmatch(value.strip()) if isinstance(value, str) else None
    return int(match.group(1)) if match else None


def worst_layers(per_layer: Sequence[Mapping[str, Any]], k: int) -> list[int]:
    """The ``k`` layers of a transfer's final table (rows with ``layer`` and ``mse_after``) whose held-out MSE
    is highest, sorted by index."""
    ranked = sorted(per_layer, key=lambda row: float(row["mse_after"]), reverse=True)
    return sorted(int(row["layer"]) for row in ranked[:k])


def resolve_softmax_layers(value: Any, run_dir: Path | None) -> list[int]:
    """The layer indices ``value`` names: ``[]`` for None, the list itself, or for ``"auto:K"`` the K worst
    layers of the finished transfer run ``run_dir`` (ConfigError naming the file when it cannot be read)."""
    if value is None:
        return []
    k = auto_count(value)
    if k is None:
        return sorted(int(i) for i in value)
    from ..train.checkpoint import load_json

    metrics = Path(run_dir) / METRICS if run_dir is not None else None
    rows = load_json(metrics).get("layers") if metrics is not None and metrics.is_file() else None
    if not rows:
        raise ConfigError(
            f"attention.softmax_layers={value!r} needs the per-layer MSE of a finished transfer run, "
            f"and {metrics or 'no run directory'} has none",
            hint="finish `lolcats transfer` first, or name the layers: attention.softmax_layers=[3,7]",
        )
    if k >= len(rows):
        raise ConfigError(f"attention.softmax_layers={value!r} would keep all {len(rows)} converted layers as "
                          "softmax, leaving nothing linear", hint=f"use auto:K with K below {len(rows)}")
    return worst_layers(rows, k)


def without(layers: Sequence[int], softmax: Sequence[int]) -> list[int]:
    """The converted layers once the softmax ones are taken out."""
    keep = set(softmax)
    return [i for i in layers if i not in keep]


def layer_of(name: str) -> int | None:
    """The decoder-layer index in a parameter name such as ``model.layers.7.self_attn.window_logits``."""
    match = re.search(r"\.layers\.(\d+)\.", f".{name}")
    return int(match.group(1)) if match else None


def drop_layers(state: Mapping[str, Any], softmax: Sequence[int]) -> dict[str, Any]:
    """``state`` (attention weights) without the entries of the ``softmax`` layers."""
    gone = set(softmax)
    return {name: t for name, t in state.items() if layer_of(name) not in gone}


__all__ = ["auto_count", "check_softmax_layers", "drop_layers", "layer_of", "resolve_softmax_layers", "without",
           "worst_layers"]
