"""Decoding converted models: a transformers ``Cache`` whose converted layers hold a constant-size recurrent state.

Per converted layer (student mode) the cache keeps a :class:`~lolcats_cli.kernels.recurrent.HybridState`: the
raw keys/values of the window (``span`` positions per KV head) plus the linear state ``S``, ``z`` (METHOD.md
section 1, recurrent form). Its size does not depend on the context length. Layers left as softmax keep an
ordinary growing ``DynamicLayer``.

How a cache is picked. :class:`LinearizedAttention` in student mode calls :func:`hybrid_cache_layer` on
whatever ``Cache`` the model hands it. An empty slot of *any* transformers cache (the ``DynamicCache`` that
``generate()`` or the model's own forward builds, one the user built) is replaced there by a
:class:`HybridLayer`, so ``model.generate()`` and ``model(..., cache=DynamicCache(), use_cache=True)``
decode in constant memory with no extra argument. :func:`make_cache` builds a :class:`LinearAttentionCache`
up front for callers that want one explicitly.

Left padding. Rows of a batch may start with pad tokens (mask 0 before the first real token). Pad keys
contribute nothing to either branch, and a row's window positions count from its first real token, so a
left-padded row gives the logits of its prompt alone. The kernels know one shared position per batch, so
this module keeps a per-row pad count and (i) for a whole prompt, shifts each row left so it starts at
position 0, runs the parallel kernel, and shifts the output back; (ii) for decode steps, runs the kernels'
building block :func:`~lolcats_cli.kernels.chunked.attend_chunks` with per-row window masks. Only padding
before a row's first real token is recognised: a 0 after it is treated as a real token (causal attention
makes right padding exact on the real tokens anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from ..api import Window, window_masks
from ..errors import ModelError
from ..hf_compat import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, check_cache, check_replaceable_layer
from ..kernels.chunked import attend_chunks, hybrid_attention_chunked, kv_state, not_sinks, with_sinks
from ..kernels.naive import FeatureFn, expand_kv
from ..kernels.recurrent import HybridState, hybrid_prefill, hybrid_step


class HybridAttentionModule(Protocol):
    """What a cache layer needs from the attention module it serves (a ``LinearizedAttention``)."""

    layer_idx: int
    feature_map_k: FeatureFn
    window_logits: Tensor
    window: Window
    scaling: float
    hybrid_fn: Callable[..., Tensor]  # whole-sequence form: hybrid_attention_chunked or the naive reference

    def phi_q(self, x: Tensor) -> Tensor: ...  # query features, linear gate included


# ------------------------------------------------------------------------------------------------ padding


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


def _shift_rows(x: Tensor, shift: Tensor) -> Tensor:
    """``(B, h, T, X)``: row b rotated left by ``shift[b]`` along time, ``out[b, :, i] = x[b, :, (i + s_b) % T]``."""
    B, h, T, X = x.shape
    idx = (torch.arange(T, device=x.device)[None] + shift[:, None]) % T  # (B, T)
    return x.gather(2, idx[:, None, :, None].expand(B, h, T, X))


def _keep(x: Tensor, real: Tensor) -> Tensor:
    """``(B, h, T, X)`` with the positions where ``real`` ``(B, T)`` is False set to 0 (NaN-safe, unlike ``*``)."""
    return torch.where(real[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def folded_before(window: Window, lengths: Tensor) -> Tensor:
    """Per row ``clamp(window.start(L), 0, L)`` for lengths ``L`` ``(B,)``: keys before it are in S and z."""
    return torch.minimum(window.start(lengths).clamp_min(0), lengths)


def _last(x: Tensor, n: int) -> Tensor:
    """The last ``n`` time steps of ``(B, h, T, X)`` (a copy), zero-padded in front when ``T < n``."""
    T = x.shape[2]
    if T >= n:
        return x[:, :, T - n :].clone()
    return torch.cat([x.new_zeros(*x.shape[:2], n - T, x.shape[3]), x], dim=2)


def padded_attention(q: Tensor, k: Tensor, v: Tensor, pads: Tensor, attn: HybridAttentionModule) -> Tensor:
    """Hybrid attention over whole left-padded sequences, each row exactly as if it had no padding.

    q ``(B, H, T, D)``, k/v ``(B, Hkv, T, D)``; ``pads`` ``(B,)`` leading pad counts. Rows are rotated so
    their real tokens start at position 0 (the pads go to the end, where causal attention hides them), run
    through ``attn.hybrid_fn``, and rotated back. Returns ``(B, H, T, Dv)``; pad rows are 0.
    """
    T = q.shape[2]
    real = torch.arange(T, device=q.device)[None] >= pads[:, None]  # (B, T)
    q, k, v = _keep(q, real), _keep(k, real), _keep(v, real)
    y = attn.hybrid_fn(
        _shift_rows(q, pads), _shift_rows(k, pads), _shift_rows(v, pads), attn.phi_q, attn.feature_map_k,
        attn.window_logits, attn.window, scale=attn.scaling,
    )  # fmt: skip
    return _keep(_shift_rows(y, (T - pads) % T), real)


def padded_prefill_state(
    k: Tensor, v: Tensor, pads: Tensor, num_heads: int, attn: HybridAttentionModule
) -> HybridState:
    """The decode state after left-padded prompts: k ``(B, Hkv, T, D)``, v ``(B, Hkv, T, Dv)``, pads ``(B,)``.

    Row b has ``n_b = T - pads[b]`` real tokens; S and z hold its real non-sink keys before ``f(n_b)``; the
    buffers hold the last ``span`` positions of the padded layout (pads in them are masked out by
    :func:`padded_step`); the sink buffers hold each row's first ``sinks`` real tokens.
    """
    T = k.shape[2]
    rel = torch.arange(T, device=k.device)[None] - pads[:, None]  # (B, T) position within the row
    real = rel >= 0
    k, v = _keep(k, real), _keep(v, real)
    fold = real & (rel < folded_before(attn.window, T - pads)[:, None])  # (B, T)
    fk = _keep(not_sinks(attn.feature_map_k(expand_kv(k, num_heads)).float(), rel, attn.window.sinks), fold)
    S, z = kv_state(fk, v.float())
    span = attn.window.span
    k_sink, v_sink = _row_sinks(k, pads, attn.window.sinks), _row_sinks(v, pads, attn.window.sinks)
    return HybridState(_last(k, span), _last(v, span), S, z, T, k_sink, v_sink)


def _row_sinks(x: Tensor, pads: Tensor, sinks: int) -> Tensor | None:
    """``(B, h, sinks, X)``: each row's first ``sinks`` real positions of ``x`` ``(B, h, T, X)`` (zeros past
    the row's end), or None without sinks."""
    if not sinks:
        return None
    T = x.shape[2]
    idx = pads[:, None] + torch.arange(sinks, device=x.device)[None]  # (B, sinks) padded positions
    got = x.gather(2, idx.clamp_max(max(T - 1, 0))[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
    return _keep(got, idx < T) if T else x.new_zeros(x.shape[0], x.shape[1], sinks, x.shape[3])


def padded_step(
    q: Tensor, k: Tensor, v: Tensor, pads: Tensor, attn: HybridAttentionModule, state: HybridState
) -> tuple[Tensor, HybridState]:
    """:func:`~lolcats_cli.kernels.recurrent.hybrid_step` for rows that started with ``pads`` ``(B,)`` pad tokens.

    q ``(B, H, t, D)``, k/v ``(B, Hkv, t, D)`` at padded positions ``state.length ..``; each row's window is
    placed by its own positions (padded position minus its pads), and pad keys are left out of both branches.
    Returns ``(B, H, t, Dv)`` in q's dtype and the new state.
    """
    H, t = q.shape[1], q.shape[2]
    P, L, window = attn.window.span, state.length, attn.window
    k_all = torch.cat([state.k_buf.to(k.dtype), k], dim=2)  # (B, Hkv, P + t, D): padded positions [L - P, L + t)
    v_all = torch.cat([state.v_buf.to(v.dtype), v], dim=2)
    rel_k = torch.arange(L - P, L + t, device=q.device)[None] - pads[:, None]  # (B, P + t)
    rel_q = rel_k[:, P:]  # (B, t)
    real_k = rel_k >= 0
    k_all, v_all, q = _keep(k_all, real_k), _keep(v_all, real_k), _keep(q, rel_q >= 0)
    lo = folded_before(window, (L - pads).clamp_min(0))  # (B,) keys before lo are already in S, z
    hi = folded_before(window, (L + t - pads).clamp_min(0))
    fresh = (real_k & (rel_k >= lo[:, None]))[:, None, :]  # (B, 1, P + t)
    in_window, in_linear = window_masks(window, rel_q, rel_k)  # (B, t, P + t)
    masks = [(m & fresh)[:, None, None] for m in (in_window, in_linear)]  # (B, 1, 1, t, P + t)

    fk = not_sinks(attn.feature_map_k(expand_kv(k_all, H)).float(), rel_k, window.sinks)  # (B, H, P + t, F)
    k_loc, v_loc, fk_loc = k_all.float().unsqueeze(2), v_all.float().unsqueeze(2), fk.unsqueeze(2)
    k_sink, v_sink = state.k_sink, state.v_sink
    if k_sink is not None and v_sink is not None:
        # a row's sink j comes from the sink buffer once it is older than the row's fresh keys (from lo)
        sink_window = torch.arange(window.sinks, device=q.device)[None] < lo[:, None]  # (B, sinks)
        sink_window = sink_window[:, None, None, None, :].expand(-1, 1, 1, t, -1)  # (B, 1, 1, t, sinks)
        k_loc, v_loc, fk_loc, masks[0], masks[1] = with_sinks(
            k_loc, v_loc, fk_loc, masks[0], masks[1], k_sink.float(), v_sink.float(), sink_window
        )
    y = attend_chunks(
        q.float().unsqueeze(2), attn.phi_q(q).float().unsqueeze(2), k_loc, v_loc, fk_loc,
        state.S.unsqueeze(2), state.z.unsqueeze(2), masks[0], masks[1], attn.window_logits, attn.scaling,
    ).squeeze(2)  # fmt: skip

    leaving = real_k & (rel_k >= lo[:, None]) & (rel_k < hi[:, None])  # (B, P + t): keys that leave the window
    dS, dz = kv_state(_keep(fk, leaving), v_all.float())
    if k_sink is not None and v_sink is not None:  # rows still in their first tokens: fill their sinks
        k_sink, v_sink = _fill_sinks(k_sink, k, rel_q), _fill_sinks(v_sink, v, rel_q)
    new = HybridState(
        k_all[:, :, t:].clone(), v_all[:, :, t:].clone(), state.S + dS, state.z + dz, L + t, k_sink, v_sink
    )
    return y.to(q.dtype), new


def _fill_sinks(buf: Tensor, x: Tensor, rel: Tensor) -> Tensor:
    """``buf`` ``(B, h, sinks, X)`` with each new token of ``x`` ``(B, h, t, X)`` whose row position ``rel``
    ``(B, t)`` is a sink position written into its slot."""
    slot = rel[:, None, :] == torch.arange(buf.shape[2], device=rel.device)[None, :, None]  # (B, sinks, t)
    new = torch.einsum("bst,bhtx->bhsx", slot.to(x.dtype), x).to(buf.dtype)
    return torch.where(slot.any(dim=-1)[:, None, :, None], new, buf)


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
        args = (attn.phi_q, attn.feature_map_k, attn.window_logits, attn.window)
        if self.state is None:
            if pads is None and attn.hybrid_fn is hybrid_attention_chunked:
                y, state = hybrid_prefill(q, k, v, *args, scale=attn.scaling)
            else:  # a padded batch, or a test running another whole-sequence form (attn.hybrid_fn)
                p = pads if pads is not None else torch.zeros(B, dtype=torch.long, device=q.device)
                y, state = padded_attention(q, k, v, p, attn), padded_prefill_state(k, v, p, H, attn)
        elif pads is None:
            y, state = hybrid_step(q, k, v, *args, state=self.state, scale=attn.scaling)
        else:
            y, state = padded_step(q, k, v, pads, attn, self.state)
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


class LinearAttentionCache(Cache):
    """A transformers ``Cache`` with a :class:`HybridLayer` per converted layer and a ``DynamicLayer`` per
    softmax layer; build one with :func:`make_cache`. Constant size per sequence for converted layers."""

    def __init__(self, layers: list[CacheLayerMixin]) -> None:
        super().__init__(layers=layers)


def make_cache(model: Any) -> LinearAttentionCache:
    """An empty :class:`LinearAttentionCache` for ``model``: a HybridLayer for each layer in student mode,
    and for every other layer what ``DynamicCache(config=...)`` would hold (a sliding-window layer where the
    model has one). Pass it as the cache (keyword :func:`~lolcats_cli.hf_compat.cache_kwarg`) to ``generate()``
    or ``forward``. Not required: converted layers adopt any empty dynamic transformers cache they are given."""
    from .convert import linearized_layers  # convert imports linear_attention, which imports this module

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


__all__ = [
    "HybridLayer",
    "LinearAttentionCache",
    "hybrid_cache_layer",
    "leading_pads",
    "make_cache",
    "padded_attention",
    "padded_prefill_state",
    "padded_step",
    "real_tokens",
    "state_nbytes",
]
