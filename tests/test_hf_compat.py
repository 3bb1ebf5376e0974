"""The transformers contact points (``lolcats_cli/hf_compat.py``), on a tiny converted Llama.

Whatever name the installed transformers gives the cache argument, decoding must keep the hybrid state;
anything cache-like that lolcats does not know must raise, never decode without state.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, StaticCache  # noqa: E402

from lolcats_cli.core.decode.generation import HybridLayer  # noqa: E402
from lolcats_cli.core.model.convert import convert_model, linearized_layers  # noqa: E402
from lolcats_cli.hf_compat import (  # noqa: E402
    TESTED_RANGE,
    TransformersCompatError,
    attention_cache,
    cache_kwarg,
    output_cache,
    rotary_function,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=128, max_position_embeddings=512, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    convert_model(m, feature_map="hedgehog", feature_map_params={"feature_dim": 16}, window="sliding",
                  window_params={"size": 4}, mode="student")  # fmt: skip
    for _, attn in linearized_layers(m):  # trained-ish: the linear branch carries weight
        attn.window_logits.data.normal_()
    return m


def _attention_inputs(model, t: int, start: int = 0):
    attn = linearized_layers(model)[0][1]
    hidden = torch.randn(1, t, model.config.hidden_size, generator=torch.Generator().manual_seed(start))
    pos = torch.arange(start, start + t)[None]
    return attn, hidden, model.model.rotary_emb(hidden, pos)


@pytest.mark.parametrize("how", ["cache", "past_key_values", "positional"])
def test_every_cache_argument_name_decodes_with_the_hybrid_state(model, how) -> None:
    attn, hidden, pe = _attention_inputs(model, 12)
    with torch.no_grad():
        full = attn(hidden, pe, None)[0]
        cache = DynamicCache()
        steps = []
        for i in range(12):
            h, p = hidden[:, i : i + 1], (pe[0][:, i : i + 1], pe[1][:, i : i + 1])
            if how == "positional":
                steps.append(attn(h, p, None, cache)[0])
            else:
                steps.append(attn(h, p, None, **{how: cache})[0])
    assert isinstance(cache.layers[attn.layer_idx], HybridLayer)
    assert cache.layers[attn.layer_idx].state.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_model_forward_and_generate_keep_the_state_under_this_transformers(model) -> None:
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)  # fmt: skip
        full = model(gen.sequences, use_cache=False).logits[:, 9:-1]
        out = model(ids, **{cache_kwarg(model): DynamicCache()}, use_cache=True)
    cache = output_cache(gen)
    assert [type(layer) for layer in cache.layers] == [HybridLayer, HybridLayer]
    assert [layer.state.length for layer in cache.layers] == [17, 17]
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), full, atol=1e-4, rtol=1e-4)
    assert all(isinstance(layer, HybridLayer) for layer in output_cache(out).layers)


def test_an_unknown_cache_argument_raises_naming_the_version(model) -> None:
    attn, hidden, pe = _attention_inputs(model, 3)
    with pytest.raises(TransformersCompatError, match=rf"transformers {re.escape(transformers.__version__)}.*kv_cache"):
        attn(hidden, pe, None, kv_cache=DynamicCache())
    with pytest.raises(TransformersCompatError, match="two different caches"):
        attn(hidden, pe, None, cache=DynamicCache(), past_key_values=DynamicCache())
    with pytest.raises(TransformersCompatError, match="tested with transformers"):
        attention_cache((), {"past_states": object()}, "layer 0")
    # use_cache and cache_position are not caches: they pass through
    assert attention_cache((), {"use_cache": True, "cache_position": torch.arange(3)}, "layer 0") is None


def test_a_cache_lolcats_cannot_keep_a_state_in_raises(model) -> None:
    ids = torch.randint(1, 128, (1, 6))
    static = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(TransformersCompatError, match="StaticLayer.*cannot hold a linear-attention state"):
        model(ids, **{cache_kwarg(model): static}, use_cache=True)
    attn, hidden, pe = _attention_inputs(model, 3)
    with pytest.raises(TransformersCompatError, match="not a transformers Cache"):
        attn(hidden, pe, None, cache=((torch.zeros(1), torch.zeros(1)),))


def test_rotary_lookup_fails_loudly_when_transformers_moves_it() -> None:
    fn = rotary_function("transformers.models.llama.modeling_llama", "apply_rotary_pos_emb")
    q = k = torch.randn(1, 2, 3, 8)
    cos, sin = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    assert torch.equal(fn(q, k, cos, sin)[0], q)  # angle 0: identity
    with pytest.raises(TransformersCompatError, match="has no transformers.models.llama.modeling_llama.rope"):
        rotary_function("transformers.models.llama.modeling_llama", "rope")


def test_pyproject_bounds_are_the_tested_range_and_include_this_transformers() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("transformers")]
    low, high = TESTED_RANGE
    major, minor = high.split(".")
    assert spec == f"transformers>={low},<{major}.{int(minor) + 1}"
    installed = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert tuple(int(x) for x in low.split(".")) <= installed <= (int(major), int(minor))
