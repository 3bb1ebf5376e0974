"""``attention.train_window_sizes``: a random softmax-window size per training step (both stages).

With a fixed window the linear branch only ever sees keys older than ``size`` (``2 x size`` for a terrace)
and can learn to stay quiet: the window already holds what matters nearby. Drawing the window size of each
training micro-batch from a list (e.g. ``[32, 48, 64, 96, 128]`` around a window of 64) makes the linear
branch answer for keys at every distance the window may drop, so it has to carry information; evaluation,
chat and export always use ``window_params.size``. The draw uses torch's global generator, which the trainer
reseeds from the step number, so a resumed run draws the same sizes and every rank draws the same size.
The recipe checks the list (``recipe._check_train_window_sizes``: this module imports torch, the recipe must not).

Every layer of the model gets the same size in one micro-batch. Each layer's :class:`~lolcats_cli.api.Window`
is replaced by a new instance of its own class for the duration of the forward (never mutated), so a kernel
that kept the window object for its backward (the fused Triton kernel does) keeps the size it ran with.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import torch

from ..model.linear_attention import LinearizedAttention


@contextlib.contextmanager
def random_window(layers: Iterable[LinearizedAttention], sizes: Sequence[int] | None) -> Iterator[int | None]:
    """Within the block, every layer of ``layers`` runs a window of one size drawn from ``sizes`` (uniformly,
    with torch's global generator); yields the size, or None (and changes nothing) without sizes."""
    if not sizes:
        yield None
        return
    size = int(sizes[int(torch.randint(len(sizes), ()).item())])
    layers = list(layers)
    saved = [m.window for m in layers]
    try:
        for m, window in zip(layers, saved):
            m.window = type(window)(dataclasses.replace(window.params, size=size))
        yield size
    finally:
        for m, window in zip(layers, saved):
            m.window = window


__all__ = ["random_window"]
