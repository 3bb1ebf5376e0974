"""The attention module that replaces a decoder layer's ``self_attn``: softmax teacher, hybrid student, or both.

:class:`LinearizedAttention` keeps the original projections (and Qwen3's q/k norms) under their original
attribute names, so the base model's state-dict keys are unchanged and peft can target ``q_proj`` ...
``o_proj``. It adds ``feature_map_q``, ``feature_map_k`` and ``window_logits`` (docs/method.md section 1) and runs in
one of three modes:

* ``teacher``: the original softmax attention through torch SDPA; reproduces the original model.
* ``student``: the hybrid attention through the module's :attr:`~LinearizedAttention.kernel` (chosen by
  :func:`~lolcats_cli.kernels.registry.select_kernel`; the chunked one, O(T) memory, by default) over a
  prompt, then, with a KV cache, the kernel's recurrent steps in constant memory (the cache layer is a
  :class:`~.generation.HybridLayer`; see :mod:`.generation`).
* ``transfer``: both on frozen q/k/v; stores the per-layer ``transfer_loss`` (MSE of the pre-``o_proj`` head
  outputs) and passes the teacher's output on, so every layer sees exact teacher inputs (docs/method.md section 3).

Masks: the teacher honours whatever mask the model built for its ``_attn_implementation`` (None, a 4-D bool
or additive mask, or a 2-D padding mask from flash-attention models). The student is exact under left
padding: pad keys contribute nothing and each row's window positions count from its first real token, so
a left-padded row gives the output of its prompt alone (:mod:`.generation`). Right padding is exact on the
real tokens (attention is causal). Transfer mode ignores padding: train on packed sequences.

:func:`linearized_layers` lists a model's converted layers (what the decode paths and the exports walk).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...api import FeatureMap, Window, window_masks
from ...errors import ConfigError, ModelError, did_you_mean
from ...hf_compat import attention_cache, check_cache
from ...kernels.base import Kernel
from ...kernels.blocks import DEN_EPS, decay_matrix, expand_kv, hybrid_weights
from ...kernels.delta import DeltaKernel, DeltaKeys
from ...kernels.registry import get_kernel, select_kernel
from ...kernels.triton_mse import transfer_mse
from ..decode.generation import hybrid_cache_layer, leading_pads, real_tokens

MODES: tuple[str, ...] = ("teacher", "student", "transfer")
WINDOW_FACTOR_INIT = 0.1  # g_h = sigmoid(w_h) starts at 0.1: w_h = logit(0.1) = -2.1972
# The linear gate lambda_h = softplus(LINEAR_GATE_SCALE * u_h) multiplies the linear branch (phi_q). It starts
# at softplus(-16) = 1.1e-7, so the swapped, untrained model is the softmax over sinks + window; the scale
# lets Adam (steps of about lr in u) move it by LINEAR_GATE_SCALE * lr in the exponent per step.
LINEAR_GATE_SCALE = 10.0
LINEAR_GATE_INIT = -1.6
# The optional decay of the linear branch: the term of key j at query n weighs d_h^(n - j) with
# d_h = exp(-1 / tau_h). The parameter is log tau_h (Adam moves it by about lr per step: a few percent of the
# horizon at stage 1's lr, where a sigmoid parameterisation near 1 hardly moves); the heads start spread
# log-uniformly over horizons DECAY_HORIZONS tokens, as in RetNet / GLA.
DECAY_HORIZONS = (64.0, 4096.0)
# The optional delta-rule state (kernels/delta.py): key j is written with strength
# beta_j = sigmoid(b_h + k_j . w_h / sqrt(D)); w starts at 0 and b at 0, so every key starts at beta = 0.5.
DELTA_KERNEL = DeltaKernel()


def initial_log_horizons(num_heads: int, horizons: tuple[float, float] = DECAY_HORIZONS) -> Tensor:
    """log tau ``(H,)`` fp32, spread evenly in log space from ``horizons[0]`` to ``horizons[1]`` tokens."""
    lo, hi = math.log(horizons[0]), math.log(horizons[1])
    if num_heads == 1:
        return torch.tensor([(lo + hi) / 2])
    return torch.linspace(lo, hi, num_heads)


def check_mode(mode: str) -> str:
    """``mode`` itself when it is one of :data:`MODES`; ConfigError otherwise."""
    if mode not in MODES:
        raise ConfigError(
            f"mode {mode!r} is not an attention mode; {did_you_mean(str(mode), MODES)}valid: {', '.join(MODES)}",
            hint="teacher = original softmax, student = hybrid linear attention, transfer = both (stage 1)",
        )
    return mode


# ----------------------------------------------------------------------------------------- softmax masks


def causal_window_mask(q_pos: Tensor, kv_len: int, sliding_window: int | None) -> Tensor:
    """Bool ``(..., Tq, kv_len)``, True = attend: key j <= q_pos and, with a window, j > q_pos - window.

    ``q_pos`` ``(..., Tq)`` holds absolute query positions (keys are positions ``0 .. kv_len - 1``).
    """
    k_pos = torch.arange(kv_len, device=q_pos.device)
    q = q_pos.unsqueeze(-1)
    allowed = k_pos <= q
    if sliding_window is not None:
        allowed = allowed & (k_pos > q - sliding_window)
    return allowed


def sdpa_mask(
    mask: Any, q_len: int, kv_len: int, sliding_window: int | None, device: torch.device
) -> tuple[Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for ``F.scaled_dot_product_attention`` from the mask a HF model passes.

    ``mask``: None (plain causal, SDPA's ``is_causal`` fast path), a 4-D ``(B, 1, Tq, Tkv)`` bool (True =
    attend) or additive float mask (used as is), or a 2-D ``(B, Tkv)`` padding mask (flash-attention models;
    combined with the causal, possibly sliding, pattern). Queries are the last ``q_len`` of ``kv_len`` keys.
    A mask is only materialised when padding, a cache offset or an exceeded sliding window needs one.
    """
    needs_window = sliding_window is not None and kv_len > sliding_window
    if mask is None and not needs_window and q_len in (kv_len, 1):
        return None, q_len == kv_len and q_len > 1
    if mask is not None and not isinstance(mask, Tensor):
        raise ModelError(
            f"attention mask of type {type(mask).__name__} is not supported by linearized attention",
            hint="load the model with attn_implementation='sdpa' (or 'eager')",
        )
    if mask is not None and mask.dim() == 4:
        return mask[..., :kv_len], False
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    allowed = causal_window_mask(q_pos, kv_len, sliding_window)[None, None]  # (1, 1, Tq, Tkv)
    if mask is not None:
        if mask.dim() != 2:
            raise ModelError(f"attention mask of shape {tuple(mask.shape)} is neither 2-D nor 4-D")
        allowed = allowed & mask[:, -kv_len:].bool()[:, None, None, :]
    return allowed, False


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Any, scale: float, sliding_window: int | None, dropout: float = 0.0
) -> Tensor:
    """Softmax attention through SDPA: q ``(B, H, Tq, D)``, k/v ``(B, Hkv, Tkv, D)`` -> ``(B, H, Tq, Dv)``.

    Never builds a score matrix; a ``(B, 1, Tq, Tkv)`` mask only when :func:`sdpa_mask` needs one.
    """
    attn_mask, is_causal = sdpa_mask(mask, q.shape[2], k.shape[2], sliding_window, q.device)
    if attn_mask is None:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scale, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
        )
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)


def row_bias(mask: Any, rows: Tensor, q_offset: int, kv_len: int, sliding_window: int | None) -> Tensor:
    """Additive fp32 bias ``(B, 1, n, kv_len)`` (0 or -inf, or the model's own float mask) for the query
    rows ``rows`` ``(B, n)`` (indices into this call's queries, which start at position ``q_offset``)."""
    B, n = rows.shape
    if isinstance(mask, Tensor) and mask.dim() == 4:
        full = mask[..., :kv_len].expand(B, 1, -1, kv_len)
        picked = full.gather(2, rows[:, None, :, None].expand(B, 1, n, kv_len))
        if picked.dtype != torch.bool:
            return picked.float()
        allowed = picked
    else:
        allowed = causal_window_mask(rows + q_offset, kv_len, sliding_window)[:, None]  # (B, 1, n, Tkv)
        if isinstance(mask, Tensor):  # 2-D padding mask
            allowed = allowed & mask[:, -kv_len:].bool()[:, None, None, :]
    return torch.zeros(allowed.shape, device=rows.device).masked_fill(~allowed, float("-inf"))


# ------------------------------------------------------------------------------------------- the module


class LinearizedAttention(nn.Module):
    """Drop-in replacement for a HF ``*Attention`` of the Llama family (transformers 5 call contract).

    ``forward(hidden_states (B, T, hidden), position_embeddings=(cos, sin), attention_mask, cache)
    -> (output (B, T, hidden), None)``; the cache under any name :mod:`lolcats_cli.hf_compat` knows. Shapes inside: q ``(B, H, T, D)``, k/v ``(B, Hkv, T, D)``.
    """

    def __init__(
        self,
        original: nn.Module,
        *,
        feature_map_q: FeatureMap,
        feature_map_k: FeatureMap,
        window: Window,
        rotary: Callable[..., tuple[Tensor, Tensor]],
        qk_norm: bool = False,
        sliding_window: int | None = None,
        mode: str = "student",
        plugins: dict[str, Any] | None = None,
        linear_gate: bool = False,
        decay: bool = False,
        delta_rule: bool = False,
    ) -> None:
        super().__init__()
        config = original.config
        self.config = config
        self.layer_idx: int = original.layer_idx
        self.layer_type = getattr(original, "layer_type", None)
        self.head_dim: int = original.head_dim
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # the name HF helpers read
        self.scaling: float = original.scaling
        self.attention_dropout: float = float(getattr(original, "attention_dropout", 0.0))
        self.is_causal = True
        self.sliding_window = sliding_window  # the teacher's softmax window (Mistral / Qwen), None = full

        # The original submodules under their original names: state-dict keys and peft targets unchanged.
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            original.q_proj, original.k_proj, original.v_proj, original.o_proj
        )  # fmt: skip
        if qk_norm:
            self.q_norm, self.k_norm = original.q_norm, original.k_norm
        self.qk_norm = qk_norm
        self.rotary = rotary

        device = original.q_proj.weight.device
        self.feature_map_q = feature_map_q.to(device=device, dtype=torch.float32)
        self.feature_map_k = feature_map_k.to(device=device, dtype=torch.float32)
        init = math.log(WINDOW_FACTOR_INIT / (1 - WINDOW_FACTOR_INIT))
        self.window_logits = nn.Parameter(torch.full((self.num_heads,), init, dtype=torch.float32, device=device))
        self.window = window
        self.plugins = dict(plugins or {})  # names and resolved params, for describe()
        # Optional per-head gate on the linear branch (None: the paper's method, linear weight 1).
        self.linear_gate = bool(linear_gate)
        self.linear_logits: nn.Parameter | None = None
        if self.linear_gate:
            self.linear_logits = nn.Parameter(
                torch.full((self.num_heads,), LINEAR_GATE_INIT, dtype=torch.float32, device=device)
            )
        # Optional per-head decay of the linear branch (None: no decay, the paper's method).
        self.decay = bool(decay)
        self.log_horizon: nn.Parameter | None = None
        if self.decay:
            self.log_horizon = nn.Parameter(initial_log_horizons(self.num_heads).to(device))
        # Optional delta-rule linear state (None: the additive state of the paper's method).
        self.delta_rule = bool(delta_rule)
        self.beta_weight: nn.Parameter | None = None
        self.beta_bias: nn.Parameter | None = None
        if self.delta_rule:
            self.beta_weight = nn.Parameter(torch.zeros(self.num_heads, self.head_dim, device=device))
            self.beta_bias = nn.Parameter(torch.zeros(self.num_heads, device=device))

        self.mode = check_mode(mode)
        self._kernel: Kernel | None = None  # None: the registry's choice for the device (see `kernel`)
        self.attn_ce_queries: int = 0  # > 0: also store transfer_ce on that many sampled query rows
        self.transfer_loss: Tensor | None = None
        self.transfer_ce: Tensor | None = None
        # (mse weight, ce weight): transfer mode runs this layer's backward as soon as its loss exists (then stores
        # the losses detached), so the forward never holds more than one layer's graph; None: the caller's backward
        self.eager_backward: tuple[float, float] | None = None

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, window={self.window!r}, "
                f"linear_gate={self.linear_gate}, decay={self.decay}, delta_rule={self.delta_rule}")

    @property
    def kernel(self) -> Kernel:
        """The kernel every form of this layer's hybrid attention runs through: the one set here (a name of
        :data:`~lolcats_cli.kernels.registry.KERNELS` or a Kernel), else ``LOLCATS_KERNEL``, else the best
        available on the layer's device. Set None to go back to the automatic choice. A delta-rule layer always
        runs the delta kernel (or its reference, when that was set)."""
        if self.delta_rule:
            return self._kernel if isinstance(self._kernel, DeltaKernel) else DELTA_KERNEL
        return select_kernel(self._kernel, self.window_logits.device)

    @kernel.setter
    def kernel(self, choice: str | Kernel | None) -> None:
        if choice is not None and not isinstance(choice, (str, Kernel)):
            raise ConfigError(f"layer {self.layer_idx}: kernel must be a kernel name or a Kernel; got {choice!r}",
                              hint="e.g. layer.kernel = 'naive' (see lolcats_cli.kernels.KERNELS)")
        kernel = get_kernel(choice) if isinstance(choice, str) else choice
        if self.delta_rule and kernel is not None and not isinstance(kernel, DeltaKernel):
            raise ConfigError(f"layer {self.layer_idx} uses the delta rule: kernel {kernel.name!r} does not implement it",
                              hint="a delta_rule model runs its own kernel (lolcats_cli.kernels.delta); leave the choice unset")
        self._kernel = kernel

    def linear_gate_values(self) -> Tensor | None:
        """lambda_h ``(H,)`` fp32, the weight of the linear branch per head; None without a gate (weight 1)."""
        if self.linear_logits is None:
            return None
        return F.softplus(LINEAR_GATE_SCALE * self.linear_logits.float())

    def log_decay(self) -> Tensor | None:
        """log d_h = -1 / tau_h ``(H,)`` fp32, the per-position log decay of the linear branch; None without."""
        if self.log_horizon is None:
            return None
        return -torch.exp(-self.log_horizon.float())

    def kernel_args(self) -> tuple[Any, ...]:
        """The learned arguments every form of the op takes after q, k, v: ``(phi_q, phi_k, window_logits,
        window)``; pass ``log_decay=self.log_decay()`` beside them. With the delta rule phi_k is a
        :class:`~lolcats_cli.kernels.delta.DeltaKeys` (the key features and :meth:`write_strength`)."""
        phi_k = DeltaKeys(self.feature_map_k, self.write_strength) if self.delta_rule else self.feature_map_k
        return (self.phi_q, phi_k, self.window_logits, self.window)

    def write_strength(self, k: Tensor) -> Tensor:
        """beta ``(B, H, T)`` fp32 in (0, 1) of keys ``(B, H, T, D)`` (expanded to the query heads): how strongly
        the delta-rule state replaces what it holds along each key. Delta-rule layers only."""
        if self.beta_weight is None or self.beta_bias is None:
            raise ModelError(f"layer {self.layer_idx} has no delta-rule state (attention.delta_rule is false)")
        logits = torch.einsum("bhtd,hd->bht", k.float(), self.beta_weight.float()) / math.sqrt(self.head_dim)
        return torch.sigmoid(logits + self.beta_bias.float().view(1, -1, 1))

    def phi_q(self, x: Tensor) -> Tensor:
        """The query features the kernels use: ``feature_map_q(x)`` ``(B, H, T, F)`` times the linear gate.

        The gate multiplies every linear term (numerator and shared normaliser) in every form of the op,
        so scaling the query features is all it takes."""
        fq = self.feature_map_q(x)
        gate = self.linear_gate_values()
        return fq if gate is None else fq * gate.view(1, -1, 1, 1).to(fq.dtype)

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Any = None,
        *extra: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        # The KV cache arrives as `cache` (transformers >= 5.24) or `past_key_values`; hf_compat knows the
        # names and raises on a cache-like argument it does not know, instead of decoding without state.
        cache = attention_cache(extra, kwargs, f"layer {self.layer_idx}")
        if position_embeddings is None:
            raise ModelError(f"layer {self.layer_idx}: no position_embeddings (cos, sin) were passed to attention")
        input_shape = hidden_states.shape[:-1]  # (B, T)
        self.transfer_loss = self.transfer_ce = None
        frozen = torch.no_grad() if self.mode == "transfer" else contextlib.nullcontext()
        with frozen:
            q, k, v = self._qkv(hidden_states, position_embeddings)
            if cache is not None and self.mode != "student":
                cache = check_cache(cache, f"layer {self.layer_idx}")
                seen = cache.get_seq_length(self.layer_idx) if self.mode == "transfer" else 0
                k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, T_past + T, D)
                if self.mode == "transfer" and k.shape[2] != seen + q.shape[2]:
                    raise self._cache_error(cache, k.shape[2], seen + q.shape[2])

        if self.mode == "teacher":
            dropout = self.attention_dropout if self.training else 0.0
            y = softmax_attention(q, k, v, attention_mask, self.scaling, self.sliding_window, dropout)
        elif self.mode == "student":
            y = self._student(q, k, v, attention_mask, cache)
        else:
            y = self._transfer(q, k, v, attention_mask)

        out = y.transpose(1, 2).reshape(*input_shape, -1).contiguous()  # (B, T, H * D)
        return self.o_proj(out), None

    def _cache_error(self, cache: Any, got: int, want: int) -> ModelError:
        return ModelError(
            f"layer {self.layer_idx}: {self.mode} mode needs every past key, but the KV cache "
            f"({type(cache).__name__}) returned {got} of {want} positions (it drops old keys: a sliding-window "
            "or static cache)",
            hint="pass a transformers.DynamicCache() (built without a config) as the cache, or use_cache=False",
        )

    def _qkv(self, x: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Projections, q/k norms (Qwen3, before RoPE) and RoPE: ``(B, T, hidden)`` -> q, k, v."""
        shape = (*x.shape[:-1], -1, self.head_dim)  # (B, T, heads, D)
        q, k = self.q_proj(x).view(shape), self.k_proj(x).view(shape)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v

    def _student(self, q: Tensor, k: Tensor, v: Tensor, mask: Any, cache: Any) -> Tensor:
        """Student attention of this call's tokens: q ``(B, H, T, D)``, k/v ``(B, Hkv, T, D)`` -> ``(B, H, T, Dv)``.

        With a cache: prefill, then constant-memory steps through this layer's
        :class:`~.generation.HybridLayer` (adopted into any transformers cache). Without one: the whole
        sequence through the kernel, each left-padded row as if unpadded.
        """
        if cache is not None:
            return hybrid_cache_layer(cache, self.layer_idx).attend(q, k, v, self, mask)
        real = real_tokens(mask, q.shape[2])
        if real is not None:
            pads = leading_pads(real)
            if bool(pads.any()):
                return self.kernel.attention(
                    q, k, v, *self.kernel_args(), scale=self.scaling, pads=pads, log_decay=self.log_decay()
                )
        return self._hybrid(q, k, v)

    def _hybrid(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Hybrid attention of the last ``Tq`` of ``Tkv`` positions: q ``(B, H, Tq, D)``, k/v ``(B, Hkv, Tkv, D)``.

        Used by the student without a cache (Tq = Tkv) and by transfer mode. With a KV cache in transfer mode
        (Tq < Tkv) the kernel reruns over the whole cached sequence and the earlier rows are dropped: correct
        but O(Tkv) per step; transfer is for training, where no cache is kept.
        """
        offset = k.shape[2] - q.shape[2]
        if offset > 0:
            q = torch.cat([q.new_zeros(*q.shape[:2], offset, q.shape[3]), q], dim=2)
        y = self.kernel.attention(q, k, v, *self.kernel_args(), scale=self.scaling, log_decay=self.log_decay())
        return y[:, :, offset:]

    def _transfer(self, q: Tensor, k: Tensor, v: Tensor, mask: Any) -> Tensor:
        """Store ``transfer_loss`` (and ``transfer_ce``); return the teacher's ``(B, H, Tq, Dv)`` output."""
        with torch.no_grad():
            teacher = softmax_attention(q, k, v, mask, self.scaling, self.sliding_window)
        student = self._hybrid(q, k, v)
        self.transfer_loss = transfer_mse(student, teacher)  # fp32; one fused kernel per direction on CUDA
        if self.attn_ce_queries > 0 and self.delta_rule:
            raise ConfigError(f"layer {self.layer_idx}: the attention cross-entropy is defined for the additive linear "
                              "branch, not the delta rule", hint="set transfer.attn_ce_weight: 0 with delta_rule")
        if self.attn_ce_queries > 0:
            self.transfer_ce = self._attention_ce(q, k, mask)
        if self.eager_backward is not None and self.transfer_loss.requires_grad:
            self._backward_now(*self.eager_backward)
        return teacher

    def _backward_now(self, w_mse: float, w_ce: float) -> None:
        """``(w_mse * transfer_loss + w_ce * transfer_ce).backward()`` now (outside autocast), keeping the losses
        detached: this layer's graph is freed before the next layer runs."""
        total = w_mse * self.transfer_loss
        if self.transfer_ce is not None:
            total = total + w_ce * self.transfer_ce
        with torch.autocast(self.transfer_loss.device.type, enabled=False):
            total.backward()
        self.transfer_loss = self.transfer_loss.detach()
        self.transfer_ce = None if self.transfer_ce is None else self.transfer_ce.detach()

    # -------------------------------------------------------------------------- optional attention CE

    def _attention_ce(self, q: Tensor, k: Tensor, mask: Any) -> Tensor:
        """Cross-entropy between the teacher's softmax weights and the student's normalised hybrid weights
        on ``attn_ce_queries`` random query rows per sequence: ``(B, H, n, Tkv)`` tensors, never Tq x Tkv."""
        B, H, Tq, _ = q.shape
        Tkv = k.shape[2]
        offset = Tkv - Tq
        n = min(self.attn_ce_queries, Tq)
        rows = torch.rand(B, Tq, device=q.device).argsort(dim=-1)[:, :n]  # (B, n) distinct rows per sequence
        q_rows = q.gather(2, rows[:, None, :, None].expand(B, H, n, q.shape[3]))  # (B, H, n, D)
        k = expand_kv(k, H)  # (B, H, Tkv, D)
        s = torch.einsum("bhnd,bhmd->bhnm", q_rows.float(), k.float()) * self.scaling  # (B, H, n, Tkv)

        with torch.no_grad():
            bias = row_bias(mask, rows, offset, Tkv, self.sliding_window)
            p_teacher = torch.softmax(s + bias, dim=-1).nan_to_num(0.0)  # fully masked (pad) rows -> 0

        pos = (rows + offset)[:, None, :]  # (B, 1, n) absolute query positions
        in_window, in_linear = window_masks(self.window, pos, torch.arange(Tkv, device=q.device))
        fq, fk = self.phi_q(q_rows).float(), self.feature_map_k(k).float()
        linear = torch.einsum("bhnf,bhmf->bhnm", fq, fk)
        decay = decay_matrix(self.log_decay(), pos[:, 0], torch.arange(Tkv, device=q.device)[None].expand(B, -1))
        if decay is not None:
            linear = linear * decay
        a = hybrid_weights(s, linear, in_window, in_linear, self.window_logits)  # the kernels' weights
        p_student = a / a.sum(dim=-1, keepdim=True).clamp_min(DEN_EPS)
        return -(p_teacher * p_student.clamp_min(1e-12).log()).sum(dim=-1).mean()

    # -------------------------------------------------------------------------------------- parameters

    def attention_parameters(self) -> dict[str, nn.Parameter]:
        """The new trainable parameters by their names inside this module (feature maps + window logits)."""
        out = {f"feature_map_q.{n}": p for n, p in self.feature_map_q.named_parameters()}
        out.update({f"feature_map_k.{n}": p for n, p in self.feature_map_k.named_parameters()})
        out["window_logits"] = self.window_logits
        if self.linear_logits is not None:
            out["linear_logits"] = self.linear_logits
        if self.log_horizon is not None:
            out["log_horizon"] = self.log_horizon
        if self.beta_weight is not None and self.beta_bias is not None:
            out["beta_weight"], out["beta_bias"] = self.beta_weight, self.beta_bias
        return out



def linearized_layers(model: nn.Module) -> list[tuple[int, LinearizedAttention]]:
    """``(layer_idx, module)`` for every converted layer, sorted; works through peft wrappers."""
    found = [(m.layer_idx, m) for m in model.modules() if isinstance(m, LinearizedAttention)]
    return sorted(found, key=lambda item: item[0])


def install_recall_kernel(model: nn.Module, slots: int | None, hint: str,
                          no_layers_hint: str | None = None) -> list[tuple[LinearizedAttention, Any]]:
    """Every converted layer of ``model`` runs the recall kernel with ``slots`` exact keys per KV head (None:
    ``LOLCATS_RECALL_SLOTS`` or its default). Returns ``(layer, its previous kernel choice)`` for each, so a caller
    can put them back (``layer.kernel = previous``). ModelError for a model without lolcats layers (an ``hf`` export
    bundles its own attention; ``no_layers_hint``, else ``hint``) or with delta-rule layers (the cache keeps the
    additive state; ``hint``)."""
    from ...kernels.recall import RecallKernel

    layers = [m for _, m in linearized_layers(model)]
    if not layers:
        raise ModelError("a recall cache needs the model's lolcats attention layers; this model has none "
                         "(an `lolcats export --format hf` folder bundles its own attention)",
                         no_layers_hint or hint)  # fmt: skip
    if delta := [m.layer_idx for m in layers if m.delta_rule]:
        raise ModelError(f"layer {delta[0]} keeps a delta-rule state; the recall cache works with the additive state",
                         hint)  # fmt: skip
    before = [(m, m._kernel) for m in layers]
    kernel = RecallKernel(slots)
    for m in layers:
        m.kernel = kernel
    return before


__all__ = [
    "DECAY_HORIZONS", "LinearizedAttention", "MODES", "causal_window_mask", "check_mode", "initial_log_horizons",
    "install_recall_kernel", "linearized_layers", "sdpa_mask", "softmax_attention",
]
