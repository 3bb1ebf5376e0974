"""The kernel seam: :class:`Kernel`, one implementation of hybrid attention in every form the library runs.

Every form takes the same arguments, in this order::

    q (B, H, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv)   after RoPE; H a multiple of Hkv
    phi_q, phi_k                                          feature maps (B, H, T, D) -> (B, H, T, F)
    window_logits (H,), window                            the window factor's logits and the Window
    [state]                                               step only: the HybridState before these tokens
    *, scale=None (D ** -0.5), pads=None                  pads (B,): leading pad tokens of each row
    log_decay=None                                        (H,) <= 0: the linear term of key j at query n
                                                          is multiplied by exp(log_decay[h] * (n - j))

and returns ``(B, H, T, Dv)`` in q's dtype (prefill and step: with the :class:`~.recurrent.HybridState` after).
A left-padded row (``pads``) gives exactly the output of its real tokens alone.

A kernel implements :meth:`Kernel.sequence` (one whole unpadded sequence from position 0); the padded,
prefill and step forms default to the shared implementations (:mod:`.padded`, :mod:`.recurrent`) built on
it, and a kernel overrides any of them it does faster. Register it in :mod:`.registry`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..api import Window
from .blocks import FeatureFn
from .padded import padded_attention, padded_prefill_state, padded_step
from .recurrent import HybridState, hybrid_step


STEP_CHUNK = 256  # tokens :meth:`Kernel.step` attends at once; longer steps go in chunks of this many


class Kernel:
    """One implementation of hybrid attention (see the module docstring for the shared signature).

    ``name``: its key in :data:`~.registry.KERNELS` and the value of ``LOLCATS_KERNEL`` that picks it.
    ``priority``: the automatic choice is the available kernel of highest priority; a negative priority
    (the naive reference) is only used when asked for by name. ``exact``: whether it computes the op itself
    (agreement tests hold it to the naive reference) or an approximation of it.
    """

    name: str = ""
    priority: int = 0
    exact: bool = True  # computes the op itself; False for an approximation (the recall cache), never auto-chosen
    step_chunk: int = STEP_CHUNK  # tokens :meth:`step` hands :meth:`step_tokens` at once

    def available(self, device: torch.device) -> bool:
        """Whether this kernel can run on ``device`` here (a GPU kernel checks the device and its library)."""
        return True

    def sequence(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, scale: float | None = None, *, log_decay: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Hybrid attention over whole unpadded sequences that start at position 0: ``(B, H, T, Dv)``."""
        raise NotImplementedError(f"kernel {self.name!r} does not implement sequence()")

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, *, scale: float | None = None, pads: Tensor | None = None, log_decay: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Hybrid attention over whole sequences (training, evaluation, a forward without cache).

        Returns ``(B, H, T, Dv)``; rows with ``pads`` ``(B,)`` go through :func:`~.padded.padded_attention`
        (pad rows of the output are 0)."""
        if pads is None:
            return self.sequence(q, k, v, phi_q, phi_k, window_logits, window, scale, log_decay=log_decay)
        return padded_attention(
            self.sequence, q, k, v, phi_q, phi_k, window_logits, window, pads, scale, log_decay=log_decay
        )

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, *, scale: float | None = None, pads: Tensor | None = None, log_decay: Tensor | None = None,
    ) -> tuple[Tensor, HybridState]:  # fmt: skip
        """:meth:`attention` over prompts plus the decode state after them: ``(B, H, T, Dv)`` and the state."""
        y = self.attention(q, k, v, phi_q, phi_k, window_logits, window, scale=scale, pads=pads, log_decay=log_decay)
        rows = pads if pads is not None else torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return y, padded_prefill_state(k, v, phi_k, window, rows, q.shape[1], log_decay=log_decay)

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, state: HybridState, *, scale: float | None = None, pads: Tensor | None = None,
        log_decay: Tensor | None = None,
    ) -> tuple[Tensor, HybridState]:  # fmt: skip
        """Attend t >= 1 new tokens after ``state`` and advance it: ``(B, H, t, Dv)`` and the new state.

        More than :attr:`step_chunk` tokens (a prompt continued in chunks, a chat turn) are attended
        :attr:`step_chunk` at a time by :meth:`step_tokens`, each after the state the previous ones left: the same
        result, with memory linear in t (one call attends its tokens over the window buffer and themselves at
        once, t x (span + t) scores). A kernel overrides :meth:`step_tokens`, not this."""
        if q.shape[2] <= self.step_chunk:
            return self.step_tokens(q, k, v, phi_q, phi_k, window_logits, window, state, scale=scale, pads=pads,
                                    log_decay=log_decay)  # fmt: skip
        ys = []
        for a in range(0, q.shape[2], self.step_chunk):
            part = slice(a, a + self.step_chunk)
            y, state = self.step_tokens(q[:, :, part], k[:, :, part], v[:, :, part], phi_q, phi_k, window_logits,
                                        window, state, scale=scale, pads=pads, log_decay=log_decay)  # fmt: skip
            ys.append(y)
        return torch.cat(ys, dim=2), state

    def step_tokens(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureFn, phi_k: FeatureFn, window_logits: Tensor,
        window: Window, state: HybridState, *, scale: float | None = None, pads: Tensor | None = None,
        log_decay: Tensor | None = None,
    ) -> tuple[Tensor, HybridState]:  # fmt: skip
        """:meth:`step` for at most :attr:`step_chunk` tokens at once (the shared recurrent and padded forms)."""
        if pads is None:
            return hybrid_step(q, k, v, phi_q, phi_k, window_logits, window, state, scale, log_decay=log_decay)
        return padded_step(q, k, v, phi_q, phi_k, window_logits, window, state, pads, scale, log_decay=log_decay)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


__all__ = ["STEP_CHUNK", "Kernel"]
