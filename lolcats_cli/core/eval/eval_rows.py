"""The attention setting of each row ``lolcats eval`` reports (see :mod:`.evaluate` for the rows).

:func:`as_row` puts a converted model in a row's setting for a block: the teacher (softmax, adapters off), the
training-free sink window (:func:`sink_attention`: a 4-D mask of the last ``SINK_WINDOW`` keys plus the first
``SINK_TOKENS``), the linearized model, the same with its linear branch zeroed (:func:`zero_linear_branch`), or
with a recall cache (:func:`recall_kernel`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError, did_you_mean
from ...hf_compat import peek_attention_cache

ROWS: tuple[str, ...] = ("teacher", "sink_window", "linearized", "linear_zeroed", "linearized_recall")
DEFAULT_ROWS: tuple[str, ...] = ROWS[:4]
SOFTMAX_ROWS: tuple[str, ...] = ("teacher", "sink_window")
SINK_WINDOW, SINK_TOKENS = 64, 4


# ---------------------------------------------------------------------------------- attention variants


def sink_mask(q_start: int, q_len: int, kv_len: int, window: int, sinks: int, device: torch.device) -> Tensor:
    """Bool ``(1, 1, Tq, Tkv)``, True = attend: key j <= query i and (j > i - window or j < sinks).

    Queries are positions ``q_start .. q_start + q_len - 1``; keys ``0 .. kv_len - 1``.
    """
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return ((k <= q) & ((k > q - window) | (k < sinks)))[None, None]


def _combine(mask: Tensor, given: Any) -> Tensor:
    """``mask`` AND the mask the model passed (None, 4-D bool / additive, or 2-D padding)."""
    kv_len = mask.shape[-1]
    if not isinstance(given, Tensor):
        return mask
    if given.dim() == 4:
        g = given[..., :kv_len]
        return mask & (g if g.dtype == torch.bool else g > torch.finfo(g.dtype).min / 2)
    return mask & given[:, -kv_len:].bool()[:, None, None, :]


@contextlib.contextmanager
def sink_attention(model: nn.Module, window: int = SINK_WINDOW, sinks: int = SINK_TOKENS) -> Iterator[None]:
    """Within the block, every converted layer's softmax sees only the last ``window`` keys and the first
    ``sinks`` tokens (teacher mode). Implemented as forward pre-hooks that replace the attention mask."""
    from ..model.linear_attention import linearized_layers

    built: dict[tuple[int, int, torch.device], Tensor] = {}  # one mask per forward, shared by the layers

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = list(args)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = peek_attention_cache(tuple(args), kwargs)
        past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
        key = (past, hidden.shape[-2], hidden.device)
        if key not in built:
            built.clear()
            built[key] = sink_mask(past, hidden.shape[-2], past + hidden.shape[-2], window, sinks, hidden.device)
        if len(args) > 2:
            args[2] = _combine(built[key], args[2])
        else:
            kwargs["attention_mask"] = _combine(built[key], kwargs.get("attention_mask"))
        return tuple(args), kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for _, m in linearized_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Zeroed(nn.Module):
    """A feature map whose output is all zeros (same shape and dtype as the wrapped map's)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H, T, F) of zeros
        return torch.zeros_like(self.inner(x))


@contextlib.contextmanager
def zero_linear_branch(model: nn.Module) -> Iterator[None]:
    """Within the block phi_q is zero in every converted layer: the linear branch adds nothing to the
    numerator or the shared normaliser, so only the softmax window carries (student mode)."""
    from ..model.linear_attention import linearized_layers

    layers = [m for _, m in linearized_layers(model)]
    originals = [m.feature_map_q for m in layers]
    try:
        for m, fm in zip(layers, originals, strict=True):
            m.feature_map_q = _Zeroed(fm)
        yield
    finally:
        for m, fm in zip(layers, originals, strict=True):
            m.feature_map_q = fm


def softmax_layers_of(model: nn.Module) -> list[int]:
    """The decoder layers of a converted model that are not converted (kept as softmax attention)."""
    from ..model.linear_attention import linearized_layers

    converted = {i for i, _ in linearized_layers(model)}
    return [i for i in range(model.config.num_hidden_layers) if i not in converted]


@contextlib.contextmanager
def recall_kernel(model: nn.Module, slots: int | None) -> Iterator[None]:
    """Within the block every converted layer runs the recall kernel with ``slots`` keys per KV head (None:
    ``LOLCATS_RECALL_SLOTS`` or its default); each layer's own kernel choice is restored afterwards. ModelError
    for a model the recall cache does not take (:func:`~..model.linear_attention.install_recall_kernel`)."""
    from ..model.linear_attention import install_recall_kernel

    before = install_recall_kernel(model, slots, "evaluate without --recall")
    try:
        yield
    finally:
        for m, k in before:
            m.kernel = k


@contextlib.contextmanager
def as_row(model: nn.Module, row: str, *, peft_model: Any = None, sink_window: int = SINK_WINDOW,
           sinks: int = SINK_TOKENS, recall_slots: int | None = None) -> Iterator[None]:
    """Put the converted ``model`` in the attention setting of ``row`` (one of :data:`ROWS`) for the block.

    ``peft_model``: the PeftModel around ``model`` of a finetune run; its adapters are off for the softmax
    rows (the teacher is the original model). The previous mode is restored afterwards.
    """
    from ..model.convert import set_mode
    from ..model.linear_attention import linearized_layers

    if row not in ROWS:
        raise ConfigError(f"row {row!r} is not an evaluation row; {did_you_mean(row, ROWS)}valid: {', '.join(ROWS)}")
    before = linearized_layers(model)[0][1].mode
    try:
        with contextlib.ExitStack() as stack:
            if row in SOFTMAX_ROWS:
                set_mode(model, "teacher")
                if peft_model is not None:
                    stack.enter_context(peft_model.disable_adapter())
                if row == "sink_window":
                    stack.enter_context(sink_attention(model, sink_window, sinks))
            else:
                set_mode(model, "student")
                if row == "linear_zeroed":
                    stack.enter_context(zero_linear_branch(model))
                if row == "linearized_recall":
                    stack.enter_context(recall_kernel(model, recall_slots))
            yield
    finally:
        set_mode(model, before)


__all__ = [
    "DEFAULT_ROWS", "ROWS", "SINK_TOKENS", "SINK_WINDOW", "SOFTMAX_ROWS", "as_row", "recall_kernel", "sink_attention",
    "sink_mask", "softmax_layers_of", "zero_linear_branch",
]
