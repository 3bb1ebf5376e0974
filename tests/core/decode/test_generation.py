"""Decoding converted models with the constant-size cache (``core/decode/generation.py``), on tiny random models.

Reference everywhere: one full forward without a cache (the chunked kernel over the whole sequence). Windows of
4 and 8 keys so that window and terrace-block boundaries are crossed within a few dozen tokens; fp32 and a
tight tolerance, since the recurrent and the parallel forms compute the same sums.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from lolcats_cli.core.decode.cache import LinearAttentionCache, make_cache  # noqa: E402
from lolcats_cli.core.decode.generation import HybridLayer, state_nbytes  # noqa: E402
from lolcats_cli.core.model.convert import (  # noqa: E402
    attention_parameters,
    convert_model,
    linearized_layers,
    set_mode,
)
from lolcats_cli.errors import ModelError  # noqa: E402
from lolcats_cli.hf_compat import cache_kwarg, output_cache  # noqa: E402
from lolcats_cli.kernels.chunked import hybrid_prefill  # noqa: E402
from lolcats_cli.kernels.padded import padded_prefill_state  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 128
SMALL = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
    vocab_size=VOCAB, max_position_embeddings=8192, pad_token_id=0, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
WINDOWS = {  # id: (window, size[, sinks])
    "sliding4": ("sliding", 4),
    "sliding4-sinks3": ("sliding", 4, 3),
    "terrace4-sinks2": ("terrace", 4, 2),
    "terrace8-sinks11": ("terrace", 8, 11),
    "none-sinks2": ("none", 4, 2),
    "sliding8": ("sliding", 8),
    "terrace4": ("terrace", 4),
    "terrace8": ("terrace", 8),
    "none": ("none", 4),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(window: str = "terrace", size: int = 4, sinks: int = 0, layers="all", arch: str = "llama", seed: int = 0):
    """A 2-layer random model, converted (student), with random ("trained-ish") feature maps and window factors."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**SMALL)
    else:  # every layer a 16-key softmax window: the model's own cache drops old keys
        cfg = transformers.MistralConfig(**SMALL, sliding_window=16)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    convert_model(model, feature_map="hedgehog", feature_map_params={"feature_dim": 16}, window=window,
                  window_params={"size": size, "sinks": sinks}, layers=layers, mode="student")  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in attention_parameters(model).items():
            p.add_(torch.randn(p.shape, generator=gen) * (1.0 if name.endswith("window_logits") else 0.3))
    return model


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _full_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def _decode(model, ids: torch.Tensor, sizes: list[int], cache=None) -> torch.Tensor:
    """Logits of feeding ``ids`` through one cache in calls of ``sizes`` tokens (the first call is the prefill)."""
    cache = DynamicCache() if cache is None else cache
    out, at = [], 0
    with torch.no_grad():
        for n in sizes:
            out.append(model(ids[:, at : at + n], **{cache_kwarg(model): cache}, use_cache=True).logits)
            at += n
    assert at == ids.shape[1] and cache.get_seq_length() == at
    return torch.cat(out, dim=1)


def _greedy_full(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards (no cache at all)."""
    for _ in range(steps):
        nxt = _full_logits(model, ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


# ------------------------------------------------------------------------------- cache vs full forward


@pytest.mark.parametrize("name", list(WINDOWS))
def test_token_by_token_decode_matches_full_forward(name: str) -> None:
    model, ids = _model(*WINDOWS[name]), _ids(2, 40)
    full = _full_logits(model, ids)
    torch.testing.assert_close(_decode(model, ids, [5] + [1] * 35), full, **TOL)


@pytest.mark.parametrize("name", ["sliding4", "terrace8", "none", "terrace4-sinks2", "terrace8-sinks11"])
def test_multi_token_steps_match_full_forward(name: str) -> None:
    model, ids = _model(*WINDOWS[name]), _ids(2, 45)
    full = _full_logits(model, ids)
    torch.testing.assert_close(_decode(model, ids, [3, 1, 5, 2, 9, 1, 7, 13, 4]), full, **TOL)


def test_explicit_cache_and_naive_prefill_agree() -> None:
    """make_cache() gives the same logits as an adopted DynamicCache; a prefill through the naive kernel too."""
    model, ids = _model("terrace", 4), _ids(2, 20)
    full = _full_logits(model, ids)
    cache = make_cache(model)
    assert isinstance(cache, LinearAttentionCache) and all(isinstance(layer, HybridLayer) for layer in cache.layers)
    torch.testing.assert_close(_decode(model, ids, [9] + [1] * 11, cache), full, **TOL)
    for _, layer in linearized_layers(model):
        layer.kernel = "naive"
    torch.testing.assert_close(_decode(model, ids, [9, 4, 7]), full, **TOL)


def test_padded_prefill_state_without_pads_equals_kernel_state() -> None:
    attn = linearized_layers(_model("terrace", 4))[0][1]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 19, 16, generator=gen) for h in (4, 2, 2))
    _, ref = hybrid_prefill(q, k, v, attn.feature_map_q, attn.feature_map_k, attn.window_logits, attn.window)
    got = padded_prefill_state(k, v, attn.feature_map_k, attn.window, torch.zeros(2, dtype=torch.long), 4)
    for a, b in [(got.k_buf, ref.k_buf), (got.v_buf, ref.v_buf), (got.S, ref.S), (got.z, ref.z)]:
        torch.testing.assert_close(a, b, **TOL)
    assert got.length == ref.length == 19


def test_state_size_is_constant_in_context_length() -> None:
    model = _model("terrace", 8)
    sizes = {}
    for length, chunks in [(100, [100]), (5000, [1000] * 5)]:
        ids = _ids(1, length + 3, seed=length)
        cache = DynamicCache()
        with torch.no_grad():
            for i, n in enumerate(chunks):
                model(ids[:, i * 1000 : i * 1000 + n], **{cache_kwarg(model): cache}, use_cache=True)
            for j in range(length, length + 3):
                logits = model(ids[:, j : j + 1], **{cache_kwarg(model): cache}, use_cache=True).logits
        assert torch.isfinite(logits).all()
        assert cache.get_seq_length() == length + 3
        sizes[length] = state_nbytes(cache)
    assert sizes[100] == sizes[5000] > 0


# -------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("name", ["sliding4", "terrace4", "none", "sliding4-sinks3"])
def test_generate_greedy_equals_greedy_over_full_forwards(name: str) -> None:
    model, ids = _model(*WINDOWS[name]), _ids(2, 7)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)  # fmt: skip
    assert torch.equal(out.sequences, _greedy_full(model, ids, 20))
    full = _full_logits(model, out.sequences)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, 6:-1], **TOL)
    assert all(isinstance(layer, HybridLayer) for layer in output_cache(out).layers)  # adopted automatically
    assert output_cache(out).get_seq_length() == 26


def test_generate_sampling_is_seeded_and_stops_on_eos() -> None:
    model, ids = _model("sliding", 8), _ids(1, 5)

    def sample(**kwargs) -> list[int]:
        torch.manual_seed(123)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=True,
                                 top_k=20, temperature=0.9, **kwargs)  # fmt: skip
        return out[0, 5:].tolist()

    first = sample()
    assert len(first) == 15 and sample() == first
    stop_at = next(i for i in range(3, 15) if first[i] not in first[:i])  # a token not sampled before
    assert sample(eos_token_id=first[stop_at], pad_token_id=0) == first[: stop_at + 1]


def test_beam_search_with_cache_equals_without() -> None:
    """Beam search reorders the cache (``reorder_cache``); without a cache every step is a full forward."""
    model, ids = _model("terrace", 4), _ids(2, 6)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_partially_converted_model_keeps_a_softmax_cache() -> None:
    model, ids = _model("terrace", 4, layers=[1]), _ids(2, 6)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(out.sequences, _greedy_full(model, ids, 16))
    softmax, hybrid = output_cache(out).layers
    assert isinstance(softmax, DynamicLayer) and softmax.keys.shape[2] == 21  # the last token is never fed back
    assert isinstance(hybrid, HybridLayer) and hybrid.get_seq_length() == 21
    assert state_nbytes(output_cache(out)) == hybrid.nbytes() + softmax.keys.nbytes + softmax.values.nbytes

    cache = make_cache(model)
    assert isinstance(cache.layers[0], DynamicLayer) and isinstance(cache.layers[1], HybridLayer)
    torch.testing.assert_close(_decode(model, ids, [4, 1, 1], cache), _full_logits(model, ids), **TOL)


def test_mistral_student_decodes_with_the_models_own_sliding_cache() -> None:
    """The model's own cache keeps 16 softmax keys; converted layers swap those layers for a hybrid state."""
    model, ids = _model("terrace", 4, arch="mistral"), _ids(2, 24)
    full = _full_logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :20], use_cache=True)
        step = model(ids[:, 20:24], **{cache_kwarg(model): output_cache(out)}, use_cache=True).logits
    torch.testing.assert_close(torch.cat([out.logits, step], dim=1), full, **TOL)


def test_make_cache_keeps_sliding_softmax_layers() -> None:
    model, ids = _model("sliding", 4, layers=[1], arch="mistral"), _ids(2, 24)
    cache = make_cache(model)
    assert type(cache.layers[0]).__name__ == "DynamicSlidingWindowLayer" and isinstance(cache.layers[1], HybridLayer)
    torch.testing.assert_close(_decode(model, ids, [18] + [1] * 6, cache), _full_logits(model, ids), **TOL)


# ------------------------------------------------------------------------------------------ left padding


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("name", ["sliding4", "terrace4", "terrace8", "none", "sliding4-sinks3", "terrace8-sinks11"])
@pytest.mark.parametrize("layers", ["all", [0]])
def test_left_padded_batch_generates_as_each_prompt_alone(name: str, layers) -> None:
    model = _model(*WINDOWS[name], layers=layers)
    prompts = [_ids(1, 6, seed=5)[0], _ids(1, 15, seed=6)[0]]
    ids, mask = _left_pad(prompts)
    kw = dict(max_new_tokens=14, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
            assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, len(p) :])
            for step_batch, step_alone in zip(batch.logits, alone.logits):
                torch.testing.assert_close(step_batch[i], step_alone[0], **TOL)


@pytest.mark.parametrize("name", ["sliding4", "terrace4", "terrace4-sinks2"])
def test_left_padded_forward_and_chunked_prefill_match_unpadded(name: str) -> None:
    """Without a cache, and with a cache fed 3 tokens at a time (the short row is all padding at first)."""
    model = _model(*WINDOWS[name])
    prompts = [_ids(1, 17, seed=7)[0], _ids(1, 9, seed=8)[0]]
    ids, mask = _left_pad(prompts)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    alone = [_full_logits(model, p[None])[0] for p in prompts]

    no_cache = _full_logits(model, ids, attention_mask=mask, position_ids=pos)
    cache, chunks = DynamicCache(), []
    with torch.no_grad():
        for a in range(0, ids.shape[1], 3):
            b = min(a + 3, ids.shape[1])
            chunks.append(model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                                **{cache_kwarg(model): cache}, use_cache=True).logits)  # fmt: skip
    cached = torch.cat(chunks, dim=1)
    for i, p in enumerate(prompts):
        real = mask[i].bool()
        torch.testing.assert_close(no_cache[i, real], alone[i], **TOL)
        torch.testing.assert_close(cached[i, real], alone[i], **TOL)


def test_tokenizer_left_padding_through_generate(tiny_model_dir, tiny_tokenizer) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    convert_model(model, feature_map_params={"feature_dim": 16}, window="terrace", window_params={"size": 4})
    tok = tiny_tokenizer
    texts = ["def f(x):", "The quick brown fox jumps over the lazy dog and keeps running"]
    batch = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is padded
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        out = model.generate(**batch, **kw)
        for i, text in enumerate(texts):
            alone = model.generate(**tok([text], return_tensors="pt"), **kw)
            assert out[i, -10:].tolist() == alone[0, -10:].tolist()


# ---------------------------------------------------------------------------------------------- errors


def test_cache_misuse_raises_clear_errors() -> None:
    model, ids = _model("sliding", 4), _ids(2, 6)
    cache = make_cache(model)
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): cache}, use_cache=True)
        with pytest.raises(ModelError, match="holds 2 sequences but this call has 1"):
            model(ids[:1, :1], **{cache_kwarg(model): cache}, use_cache=True)
        with pytest.raises(ModelError, match="cannot remove 2 tokens"):
            cache.crop(-2)
        set_mode(model, "teacher")
        with pytest.raises(ModelError, match="cannot serve softmax attention"):
            model(ids[:, :1], **{cache_kwarg(model): cache}, use_cache=True)
        teacher_cache = DynamicCache()
        model(ids, **{cache_kwarg(model): teacher_cache}, use_cache=True)
        set_mode(model, "student")
        with pytest.raises(ModelError, match="already holds 6 softmax keys"):
            model(ids[:, :1], **{cache_kwarg(model): teacher_cache}, use_cache=True)
