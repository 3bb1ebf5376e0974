"""A tiny random Llama (4 query / 2 KV heads, 2 layers) converted with a sliding window: shared by the tests of
sinks, the gate and the decay."""

from __future__ import annotations

import torch
import transformers

from lolcats_cli.core.model.convert import convert_model

SMALL = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
    vocab_size=128, max_position_embeddings=1024, pad_token_id=0, bos_token_id=None, eos_token_id=None,
)  # fmt: skip


def converted_model(sinks: int, gate: bool, size: int = 8, seed: int = 0, decay: bool = False, delta_rule: bool = False):
    """The model in student mode, its base weights from ``seed``, Hedgehog maps of 16 features."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**SMALL)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    convert_model(model, feature_map="hedgehog", feature_map_params={"feature_dim": 16}, window="sliding",
                  window_params={"size": size, "sinks": sinks}, linear_gate=gate, decay=decay, delta_rule=delta_rule,
                  mode="student")  # fmt: skip
    return model
