"""The numbers ``/stats`` shows for a chat reply: :class:`ReplyStats` (speed, time to first token, tokens read and
kept, the state's tokens and bytes) and the cache helpers behind them; re-exported by :mod:`.chat`."""

from __future__ import annotations

import dataclasses
from typing import Any


def softmax_kv_bytes(config: Any, tokens: int, bytes_per_element: int) -> int:
    """Bytes a softmax KV cache holds for one sequence of ``tokens`` positions:
    ``2 (K and V) x layers x kv_heads x head_dim x tokens x bytes_per_element``."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * tokens * bytes_per_element


def _is_hybrid_layer(layer: Any) -> bool:
    """A lolcats constant-size cache layer: ours, or the bundled copy an ``hf`` export runs (another class)."""
    return type(layer).__name__ == "HybridLayer" and callable(getattr(layer, "nbytes", None))


def state_bytes(cache: Any) -> int:
    """Bytes of generation state in ``cache`` (:func:`.generation.state_nbytes`), counting too the hybrid
    layers of an ``hf`` export's bundled runtime, which that function does not recognise."""
    from .generation import HybridLayer, state_nbytes

    layers = getattr(cache, "layers", [])
    return state_nbytes(cache) + sum(
        layer.nbytes() for layer in layers if _is_hybrid_layer(layer) and not isinstance(layer, HybridLayer)
    )


def describe_cache(cache: Any) -> str:
    """What a generation cache holds, e.g. "constant-size state in 30/30 layers" or "softmax KV cache"."""
    layers = list(getattr(cache, "layers", []))
    hybrid = sum(map(_is_hybrid_layer, layers))
    if not hybrid:
        return f"softmax KV cache, {type(cache).__name__}"
    return f"constant-size state in {hybrid}/{len(layers)} layers"


@dataclasses.dataclass(frozen=True)
class ReplyStats:
    """Speed and memory of one reply. ``tokens`` = prompt + reply, the length the cache reached."""

    prompt_tokens: int
    new_tokens: int
    seconds: float  # prefill + decode, wall clock
    first_token_seconds: float | None  # until the first new token (prefill + one step); None if none came
    state_bytes: int  # what the generation cache held at the end (generation.state_nbytes)
    softmax_kv_bytes: int  # what a softmax KV cache would hold at the same length
    cache: str  # describe_cache() of the generation cache
    read_tokens: int = -1  # prompt tokens read this turn (the rest was in the kept state); -1: all of them
    state_tokens: int = 0  # tokens the state has consumed at the end (the last new token is not fed back)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def state_mib(self) -> float:
        return self.state_bytes / 2**20

    @property
    def softmax_kv_mib(self) -> float:
        return self.softmax_kv_bytes / 2**20

    @property
    def prompt_read(self) -> int:
        """Prompt tokens read this turn."""
        return self.prompt_tokens if self.read_tokens < 0 else self.read_tokens

    def summary(self, label: str = "last reply") -> str:
        """Three lines for ``/stats``."""
        first = f", first token after {self.first_token_seconds:.2f} s" if self.first_token_seconds is not None else ""
        kept = self.prompt_tokens - self.prompt_read
        read = f"{self.prompt_read} read now, {kept} kept in the state" if kept else "all read now"
        return (
            f"{label}: {self.new_tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_s:.1f} tok/s{first}); "
            f"prompt {self.prompt_tokens} tokens ({read})\n"
            f"  state memory {self.state_mib:.2f} MiB ({self.cache}); a softmax KV cache at {self.tokens} tokens: "
            f"{self.softmax_kv_mib:.2f} MiB\n"
            f"  the state holds {self.state_tokens} tokens in {self.state_bytes} bytes (constant in length)"
        )


__all__ = ["ReplyStats", "describe_cache", "softmax_kv_bytes", "state_bytes"]
