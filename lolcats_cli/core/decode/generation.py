"""Decoding converted models: a transformers ``Cache`` whose converted layers hold a constant-size recurrent state.

Per converted layer (student mode) the cache keeps a :class:`~lolcats_cli.kernels.recurrent.HybridState`: the
raw keys/values of the window (``span`` positions per KV head) plus the linear state ``S``, ``z`` (docs/method.md
section 1, recurrent form). Its size does not depend on the context length. Layers left as softmax keep an
ordinary growing ``DynamicLayer``.

How a cache is picked. :class:`LinearizedAttention` in student mode calls :func:`hybrid_cache_layer` on
whatever ``Cache`` the model hands it. An empty slot of *any* transformers cache (the ``DynamicCache`` that
``generate()`` or the model's own forward builds, one the user built) is replaced there by a
:class:`HybridLayer`, so ``model.generate()`` and ``model(..., cache=DynamicCache(), use_cache=True)``
decode in constant memory with no extra argument. :func:`~.cache.make_cache` builds a
:class:`~.cache.LinearAttentionCache` up front for callers that want one explicitly.

Every form runs through the attention module's kernel (:class:`~lolcats_cli.kernels.base.Kernel`): its
``prefill`` on the first call, its ``step`` after. Left padding. Rows of a batch may start with pad tokens
(mask 0 before the first real token); this module reads each row's pad count from the mask
(:func:`real_tokens`, :func:`leading_pads`), keeps it in the layer, and hands it to the kernel, which gives
each row the output of its prompt alone (:mod:`lolcats_cli.kernels.padded`). Only padding before a row's
first real token is recognised: a 0 after it is treated as a real token (causal attention makes right
padding exact on the real tokens anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from ...api import Window
from ...errors import ModelError
from ...hf_compat import CacheLayerMixin, DynamicLayer, check_cache, check_replaceable_layer
from ...kernels.base import Kernel
from ...kernels.blocks import FeatureFn
from ...kernels.recurrent import HybridState


class HybridAttentionModule(Protocol):
    """What a cache layer needs from the attention module it serves (a ``LinearizedAttention``)."""

    layer_idx: int
    feature_map_k: FeatureFn
    window_logits: Tensor
    window: Window
    scaling: float
    kernel: Kernel  # the implementation of every form (lolcats_cli.kernels.registry)

    def phi_q(self, x: Tensor) -> Tensor: ...  # query features, linear gate included

    def kernel_args(self) -> tuple[Any, ...]: ...  # (phi_q, phi_k, window_logits, window)

    def log_decay(self) -> Tensor | None: ...  # (H,) per-position log decay of the linear branch, or None


# ----------------------------------------------------------------------------------------- pads from masks


def real_tokens(mask: Any, q_len: int) -> Tensor | None:
    """Bool ``(B, q_len)``: which of this call's ``q_len`` new tokens are real (not padding); None = all real.

    ``mask`` is what a HF model passes to attention: None, a 4-D ``(B, 1, Tq, Tkv)`` bool (True = attend) or
    additive float mask, whose diagonal entry says whether a token may see itself (a pad may not), or a 2-D
    ``(B, Tkv)`` padding mask (flash-attention models). New tokens are the last ``q_len`` keys of the mask.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ModelError(
            f"attention mask of type {type(mask).__name__} is not supported by linearized attention",
            hint="load the model with attn_implementation='sdpa' (or 'eager')",
        )
    if mask.dim() == 4 and mask.shape[-2] == q_len and mask.shape[-1] >= q_len:
        i = torch.arange(q_len, device=mask.device)
        diag = mask[:, 0, i, mask.shape[-1] - q_len + i]  # (B, q_len)
        return diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    if mask.dim() == 2 and mask.shape[-1] >= q_len:
        return mask[:, -q_len:].bool()
    raise ModelError(
        f"attention mask of shape {tuple(mask.shape)} does not fit {q_len} new tokens",
        hint="pass a 2-D (batch, length) attention_mask to the model and let it build the rest",
    )


def leading_pads(real: Tensor) -> Tensor:
    """``(B, T)`` bool -> ``(B,)`` long: how many tokens of each row come before its first real one."""
    return (real.long().cumsum(dim=-1) == 0).sum(dim=-1)


# ------------------------------------------------------------------------------------------- cache layer


class HybridLayer(CacheLayerMixin):
    """The cache of one converted layer: a :class:`HybridState` (constant size) and per-row pad counts.

    Filled by :meth:`attend`, never by ``update`` (there are no growing keys to return). ``get_seq_length``
    is the padded length, as for a ``DynamicLayer``, so HF builds the same masks and positions.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: HybridState | None = None
        self.pads: Tensor | None = None  # (B,) leading pad tokens per row; None: no row is padded
        self._pad_only_rows = False  # some row has seen nothing but padding so far

    def __repr__(self) -> str:
        return f"HybridLayer(length={self.get_seq_length()}, nbytes={self.nbytes()})"

    # -------------------------------------------------------------------------------------- attention

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn: HybridAttentionModule, mask: Any = None) -> Tensor:
        """Hybrid attention of ``t`` new tokens after those already in the state, and advance the state.

        q ``(B, H, t, D)``, k ``(B, Hkv, t, D)``, v ``(B, Hkv, t, Dv)`` after RoPE; ``mask`` as the model passes
        it (read only while some row has seen nothing but padding: at prefill, mostly). Returns ``(B, H, t, Dv)``.
        """
        B, H, t = q.shape[:3]
        L = self.get_seq_length()
        if self.state is not None and self.state.S.shape[0] != B:
            raise ModelError(
                f"layer {attn.layer_idx}: the cache holds {self.state.S.shape[0]} sequences but this call has {B}",
                hint="start a new cache (or call generate() without past_key_values) for a new batch",
            )
        if t == 0:
            return q.new_zeros(B, H, 0, v.shape[-1])
        pads = self._pads_after(mask, B, t, L, q.device)
        kernel, args, log_decay = attn.kernel, (q, k, v, *attn.kernel_args()), attn.log_decay()
        if self.state is None:
            y, state = kernel.prefill(*args, scale=attn.scaling, pads=pads, log_decay=log_decay)
        else:
            y, state = kernel.step(*args, self.state, scale=attn.scaling, pads=pads, log_decay=log_decay)
        self.state, self.pads, self.is_initialized = state, pads, True
        return y

    def _pads_after(self, mask: Any, B: int, t: int, L: int, device: torch.device) -> Tensor | None:
        """Leading pad counts ``(B,)`` once this call's tokens are in (None: no padding). Reads the mask only
        while some row may still be all padding, so ordinary decode steps never synchronise with the GPU."""
        if L > 0 and not self._pad_only_rows:
            return self.pads
        real = real_tokens(mask, t)
        if real is None:  # every new token is real
            self._pad_only_rows = False
            return self.pads
        old = self.pads if self.pads is not None else torch.zeros(B, dtype=torch.long, device=device)
        pads = torch.where(old == L, old + leading_pads(real.to(device)), old)  # only rows with no real token yet
        self._pad_only_rows = bool((pads == L + t).any())
        return pads if bool(pads.any()) else None

    # ---------------------------------------------------------------------------- transformers contract

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to allocate ahead: the state is built by the first :meth:`attend`."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise ModelError(
            "a linear-attention cache layer holds a recurrent state, not keys: it cannot serve softmax attention "
            "(a layer in teacher or transfer mode)",
            hint="use a fresh transformers.DynamicCache() for teacher/transfer mode, or set_mode(model, 'student')",
        )

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.length

    def get_mask_sizes(self, query_length: int | Tensor) -> tuple[int, int]:
        q_len = query_length.shape[0] if isinstance(query_length, Tensor) else int(query_length)
        return self.get_seq_length() + q_len, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:  # the state is small: never offloaded
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.state, self.pads, self._pad_only_rows, self.is_initialized = None, None, False, False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ModelError(
            f"cannot remove {abs(tokens_to_remove)} tokens from a linear-attention state: keys that left the window "
            "are summed into it",
            hint="assisted / speculative decoding is not supported with converted layers; use plain generate()",
        )

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)
        if self.pads is not None:
            self.pads = fn(self.pads)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda x: x[indices])

    def nbytes(self) -> int:
        """Bytes held: the state's tensors plus the pad counts (constant in the context length)."""
        n = 0 if self.state is None else self.state.nbytes()
        return n + (0 if self.pads is None else self.pads.numel() * self.pads.element_size())


# ------------------------------------------------------------------------------------------------ caches


def hybrid_cache_layer(cache: Any, layer_idx: int) -> HybridLayer:
    """The :class:`HybridLayer` of ``layer_idx`` in ``cache``; an empty layer of any other kind is replaced.

    ModelError when ``cache`` is not a transformers ``Cache``, its layer already holds softmax keys, or the
    layer is of a kind that cannot be swapped (:func:`~lolcats_cli.hf_compat.check_replaceable_layer`).
    """
    cache = check_cache(cache, f"layer {layer_idx}")
    while len(cache.layers) <= layer_idx:  # a lazily grown DynamicCache() (built without a config)
        make = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
        cache.layers.append(make())
    layer = cache.layers[layer_idx]
    if isinstance(layer, HybridLayer):
        return layer
    seen = layer.get_seq_length() if isinstance(layer, CacheLayerMixin) else 0
    if seen:
        raise ModelError(
            f"layer {layer_idx}: the cache already holds {seen} softmax keys (filled in teacher mode?); "
            "student mode keeps a recurrent state instead",
            hint="start a fresh cache after set_mode(model, 'student')",
        )
    check_replaceable_layer(layer, layer_idx)
    cache.layers[layer_idx] = fresh = HybridLayer()
    return fresh


def state_nbytes(cache: Any) -> int:
    """Bytes held by ``cache``: hybrid states plus the keys/values of softmax layers (for ``/stats``)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, HybridLayer):
            total += layer.nbytes()
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
    return total


__all__ = ["HybridAttentionModule", "HybridLayer", "hybrid_cache_layer", "leading_pads", "real_tokens", "state_nbytes"]
