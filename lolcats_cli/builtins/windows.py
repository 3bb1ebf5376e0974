"""Built-in windows: sliding, terrace and none (pure linear attention). See docs/method.md section 1."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..api import Window, WindowParams


class Sliding(Window):
    """``W(n) = [n - size + 1, n]``: the ``size`` most recent keys, the query included."""

    @property
    def span(self) -> int:
        return self.params.size

    def start(self, positions: Tensor) -> Tensor:
        return (positions - (self.params.size - 1)).clamp_min(0)


class Terrace(Window):
    """The reference's "tk" window: with block ``b = n // size``, ``W(n) = [size * (b - 1), n]``.

    A query sees its own block and the whole previous block (``size + 1`` to ``2 * size`` keys). lolcats
    trains, prefills and decodes with this same function (the reference decoded with a sliding window).
    """

    @property
    def span(self) -> int:
        return 2 * self.params.size

    def start(self, positions: Tensor) -> Tensor:
        size = self.params.size
        return ((torch.div(positions, size, rounding_mode="floor") - 1) * size).clamp_min(0)


@dataclasses.dataclass
class NoWindowParams(WindowParams):
    """Pure linear attention has no window; ``size`` is accepted and ignored."""


class NoWindow(Window):
    """No softmax window: every key goes through the linear branch, ``L(n) = [0, n]``."""

    Params = NoWindowParams

    @property
    def span(self) -> int:
        return 0

    def start(self, positions: Tensor) -> Tensor:
        return positions + 1
