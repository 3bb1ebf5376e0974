"""Which Hugging Face architectures lolcats can linearize, as data.

One :class:`ArchSpec` per ``config.model_type`` says where the decoder layers live, what the attention
attribute of a layer is called, where the model's own RoPE function is, whether queries and keys are
RMS-normalised per head before RoPE (Qwen3), and where a layer's softmax sliding window (if any) comes from.
Adding an architecture whose attention follows the Llama pattern (q/k/v/o projections, RoPE from
``position_embeddings``, a ``Cache.update`` for K/V) is one more entry in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from ...errors import ModelError, did_you_mean
from ...hf_compat import rotary_function

RotaryFn = Callable[..., Any]  # apply_rotary_pos_emb(q, k, cos, sin) -> (q, k)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """How to find and rebuild the attention of one architecture.

    ``layers``: dotted paths, tried in order, from the model given to ``convert_model`` to its decoder
    ``nn.ModuleList`` (a ``*ForCausalLM`` first, then the bare ``*Model``). ``attention``: the attribute
    of a decoder layer that holds the attention. ``modeling_module`` / ``rotary_fn``: the model's own RoPE
    function. ``qk_norm``: per-head ``q_norm`` / ``k_norm`` applied before RoPE. ``sliding_window``:
    ``"none"``, ``"config"`` (``config.sliding_window`` for every layer, Mistral) or ``"layer"`` (the
    original attention's ``sliding_window`` attribute, already resolved per layer, Qwen2/Qwen3).
    """

    modeling_module: str
    layers: tuple[str, ...] = ("model.layers", "layers")
    attention: str = "self_attn"
    rotary_fn: str = "apply_rotary_pos_emb"
    qk_norm: bool = False
    sliding_window: Literal["none", "config", "layer"] = "none"

    def rotary(self) -> RotaryFn:
        """The architecture's ``apply_rotary_pos_emb(q, k, cos, sin) -> (q, k)``."""
        return rotary_function(self.modeling_module, self.rotary_fn)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder layers; ModelError when none of the known paths leads to them."""
        for path in self.layers:
            obj: Any = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList):
                return obj
        raise ModelError(
            f"cannot find the decoder layers of {type(model).__name__} (looked for {', '.join(self.layers)})",
            hint="pass the causal LM (e.g. LlamaForCausalLM) or its base model, before wrapping it with peft",
        )

    def window_of(self, attention: nn.Module, config: Any) -> int | None:
        """The softmax sliding window of one original attention module, or None for full attention."""
        if self.sliding_window == "config":
            return getattr(config, "sliding_window", None)
        if self.sliding_window == "layer":
            return getattr(attention, "sliding_window", None)
        return None


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("transformers.models.llama.modeling_llama"),
    "mistral": ArchSpec("transformers.models.mistral.modeling_mistral", sliding_window="config"),
    "qwen2": ArchSpec("transformers.models.qwen2.modeling_qwen2", sliding_window="layer"),
    "qwen3": ArchSpec("transformers.models.qwen3.modeling_qwen3", qk_norm=True, sliding_window="layer"),
}


def arch_spec(config: Any) -> ArchSpec:
    """The :class:`ArchSpec` for ``config.model_type``; ModelError listing the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    supported = ", ".join(sorted(ARCHITECTURES))
    raise ModelError(
        f"model_type {model_type!r} is not supported; {did_you_mean(str(model_type), ARCHITECTURES)}"
        f"supported: {supported}",
        hint="pick a model of a supported family, or add an ArchSpec entry in lolcats_cli/core/model/architectures.py",
    )
