"""core/decode/static_decode.py: a converted tiny Llama decodes through the static cache (eagerly on CPU; the CUDA-graph
replay on CUDA only) exactly as model.generate does, left-padded batches included; the state is written back."""

from __future__ import annotations

import pytest
import torch

from lolcats_cli.core.decode.static_decode import (
    _DECODERS,
    StaticDecoder,
    decoder_for,
    install_static_generate,
    plain_loop_needed,
    static_decode_enabled,
    static_decode_problem,
    static_sample,
)
from lolcats_cli.errors import ModelError
from lolcats_cli.hf_compat import cache_kwarg, output_cache

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = torch.cuda.is_available()


def _converted(model_dir, device="cpu", dtype=torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.model.convert import convert_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    defaults = dict(window="terrace", window_params={"size": 4, "sinks": 2}, decay=True)
    return convert_model(model, **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return _converted(tiny_model_dir)


def _batch(vocab: int, pads: tuple[int, ...] = (0, 3), length: int = 13):
    ids = torch.randint(3, vocab, (len(pads), length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        ids[row, :p], mask[row, :p] = 0, 0
    return ids, mask


def _generate(model, ids, mask, n, **kwargs):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, **kwargs)


GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)


@pytest.mark.parametrize("pads", [(0, 0), (0, 3)], ids=["unpadded", "left-padded"])
def test_generate_with_the_static_loop_equals_generate(tiny, pads) -> None:
    ids, mask = _batch(tiny.config.vocab_size, pads)
    want = _generate(tiny, ids, mask, 40, **GREEDY)
    got = _generate(tiny, ids, mask, 40, custom_generate=static_sample, **GREEDY)
    assert torch.equal(got, want)
    decoder = decoder_for(tiny, 2)
    assert not decoder.graph_on and decoder.layers[0].get_seq_length() == want.shape[1] - 1


def test_the_static_loop_returns_the_cache_scores_and_stops_at_eos(tiny) -> None:
    ids, mask = _batch(tiny.config.vocab_size, (0, 3))
    want = _generate(tiny, ids, mask, 12, **GREEDY, return_dict_in_generate=True, output_scores=True)
    eos = int(want.sequences[0, ids.shape[1] + 4])  # row 0's 5th new token ends it there; row 1 goes on, padded
    want = _generate(tiny, ids, mask, 12, **GREEDY, return_dict_in_generate=True, output_scores=True, eos_token_id=eos)
    got = _generate(tiny, ids, mask, 12, **GREEDY, return_dict_in_generate=True, output_scores=True, eos_token_id=eos,
                    custom_generate=static_sample)  # fmt: skip
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) and got.logits is None
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=1e-4, rtol=1e-4)
    kept = output_cache(got)  # `cache` (transformers >= 5.24) or `past_key_values`
    assert kept.get_seq_length() == got.sequences.shape[1] - 1  # the last token is never fed back
    # the returned cache goes on: a second call reads only the new tokens and agrees with a whole re-read
    more = torch.cat([got.sequences, torch.full((2, 3), 7)], dim=1)
    mask2 = torch.cat([mask, torch.ones(2, more.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    again = _generate(tiny, more, mask2, 6, **GREEDY, custom_generate=static_sample, **{cache_kwarg(tiny): kept})
    assert torch.equal(again, _generate(tiny, more, mask2, 6, **GREEDY))


def _forced_decode(model, graph: bool, tol: float, compiler: str | None = "", s_dtype=None) -> None:
    """Prefill a left-padded batch, then 12 steps of the decoder against the eager cache fed the same tokens."""
    from lolcats_cli.core.decode.cache import make_cache

    ids, mask = _batch(model.config.vocab_size)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        cache = make_cache(model)
        logits = model(ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1]
        decoder = StaticDecoder(model, 2, graph=graph, compiler=compiler, s_dtype=s_dtype)
        size = decoder.state_nbytes()
        decoder.load(cache)
        for t in range(12):
            nxt = logits.argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position_ids = mask.sum(dim=-1, keepdim=True) - 1  # a padded row's positions start at its first token
            logits = model(nxt[:, None], attention_mask=mask, position_ids=position_ids, use_cache=True,
                           **{cache_kwarg(model): cache})
            logits = logits.logits[:, -1]
            torch.testing.assert_close(decoder.step(nxt), logits, atol=tol, rtol=tol)
        assert decoder.state_nbytes() == size and decoder.layers[0].get_seq_length() == cache.get_seq_length()
        decoder.store(cache)
        for mine, theirs in zip(decoder.layers, cache.layers):
            torch.testing.assert_close(mine.static.to_hybrid().S, theirs.state.S, atol=tol, rtol=tol)


def test_the_decoder_steps_give_generate_s_logits_and_keep_their_size(tiny) -> None:
    _forced_decode(tiny, graph=False, tol=1e-4)


def test_a_bf16_state_decodes_close_to_the_fp32_cache(tiny_model_dir, monkeypatch) -> None:
    """LOLCATS_STATE_DTYPE=bf16 keeps S in bf16 (half the bytes of S): the logits of 12 forced steps stay within
    bf16 rounding of the fp32 eager cache's; a bad value is named."""
    from lolcats_cli.core.decode.static_decode import STATE_ENV, state_dtype

    model = _converted(tiny_model_dir, linear_gate=False)  # the linear branch at full weight: S matters
    _forced_decode(model, graph=False, tol=3e-2, s_dtype=torch.bfloat16)
    monkeypatch.setenv(STATE_ENV, "bf16")
    decoder = decoder_for(model, 2)
    assert decoder.s_dtype == torch.bfloat16 and decoder.layers[0].static.S.dtype == torch.bfloat16
    fp32 = StaticDecoder(model, 2, s_dtype=torch.float32)
    assert decoder.state_nbytes() < fp32.state_nbytes()
    monkeypatch.setenv(STATE_ENV, "int8")
    with pytest.raises(ValueError, match="LOLCATS_STATE_DTYPE='int8' is not a state dtype: use fp32, bf16 or fp16"):
        state_dtype()


def test_a_compiled_decoder_steps_like_the_eager_cache(tiny_model_dir, monkeypatch) -> None:
    """The step through torch.compile (aot_eager here: dynamo's trace and the functionalised in-place state
    updates, without a C++ build) gives the eager cache's logits; LOLCATS_COMPILE_DECODE picks the backend and
    decoder_for rebuilds when it changes."""
    from lolcats_cli.core.decode.static_decode import COMPILE_ENV, compile_backend

    torch._dynamo.reset()
    model = _converted(tiny_model_dir)
    _forced_decode(model, graph=False, tol=1e-4, compiler="aot_eager")
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert compile_backend() is None and decoder_for(model, 2).compiled is None
    for value, backend in (("1", "inductor"), ("aot_eager", "aot_eager"), ("off", None)):
        monkeypatch.setenv(COMPILE_ENV, value)
        assert compile_backend() == backend
    monkeypatch.setenv(COMPILE_ENV, "aot_eager")
    assert decoder_for(model, 2).compiled == "aot_eager"  # a new decoder for the new setting


def test_models_the_static_path_cannot_run_are_refused(tiny_model_dir) -> None:
    partial = _converted(tiny_model_dir, layers=[0])
    assert "1 of 2 layers keep softmax attention" in static_decode_problem(partial)
    with pytest.raises(ModelError, match="static decoding cannot run this model"):
        StaticDecoder(partial, 1)
    assert "span 0" in static_decode_problem(_converted(tiny_model_dir, window="none"))


def test_the_env_var_turns_the_default_off_and_on(monkeypatch) -> None:
    monkeypatch.delenv("LOLCATS_STATIC_DECODE", raising=False)
    assert static_decode_enabled(torch.device("cuda")) and not static_decode_enabled(torch.device("cpu"))
    monkeypatch.setenv("LOLCATS_STATIC_DECODE", "0")
    assert not static_decode_enabled(torch.device("cuda"))
    monkeypatch.setenv("LOLCATS_STATIC_DECODE", "1")
    assert static_decode_enabled(torch.device("cuda")) and static_decode_enabled(torch.device("cpu"))


def test_plain_generate_takes_the_static_loop_where_it_can(tiny_model_dir, monkeypatch) -> None:
    model = install_static_generate(_converted(tiny_model_dir))
    ids, mask = _batch(model.config.vocab_size)
    monkeypatch.setenv("LOLCATS_STATIC_DECODE", "0")
    want = _generate(model, ids, mask, 30, **GREEDY)
    beams = _generate(model, ids, mask, 12, num_beams=2, **GREEDY)
    assert model not in _DECODERS  # both through transformers' loop
    monkeypatch.setenv("LOLCATS_STATIC_DECODE", "1")  # the CUDA default, on this CPU (eager static steps)
    assert torch.equal(_generate(model, ids, mask, 12, num_beams=2, **GREEDY), beams)
    assert model not in _DECODERS  # beam search stays on transformers' loop
    got = _generate(model, ids, mask, 30, **GREEDY)
    assert model in _DECODERS and _DECODERS[model].batch == 2  # the static loop ran
    assert torch.equal(got, want)


def test_calls_the_static_loop_cannot_run_are_named() -> None:
    assert plain_loop_needed(None, {"num_beams": 3}) == "beam search"
    assert plain_loop_needed(None, {"custom_generate": None}) == "the call names its own custom_generate"
    assert plain_loop_needed(None, {"output_hidden_states": True}) == "attentions or hidden states are returned"
    assert plain_loop_needed(None, {"prompt_lookup_num_tokens": 3}) == "assisted decoding"
    assert plain_loop_needed(None, {"do_sample": True, "temperature": 0.7}) is None


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_cuda_graph_replay_gives_the_eager_logits(tiny_model_dir, dtype, tol) -> None:
    _forced_decode(_converted(tiny_model_dir, device="cuda", dtype=dtype), graph=True, tol=tol)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_a_cuda_graph_over_the_inductor_compiled_step_gives_the_eager_logits(tiny_model_dir) -> None:
    torch._dynamo.reset()
    _forced_decode(_converted(tiny_model_dir, device="cuda"), graph=True, tol=1e-4, compiler="inductor")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_generate_equals_generate(tiny_model_dir) -> None:
    model = _converted(tiny_model_dir, device="cuda")
    ids, mask = _batch(model.config.vocab_size)
    ids, mask = ids.cuda(), mask.cuda()
    want = _generate(model, ids, mask, 64, **GREEDY)
    got = _generate(model, ids, mask, 64, custom_generate=static_sample, **GREEDY)
    decoder = decoder_for(model, 2)
    assert decoder.graph_on and decoder._graph is not None
    assert torch.equal(got, want)
    again = _generate(model, ids, mask, 64, custom_generate=static_sample, **GREEDY)
    assert decoder_for(model, 2) is decoder and torch.equal(again, got)  # the captured graph is reused


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_plain_generate_replays_a_cuda_graph_by_default(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.delenv("LOLCATS_STATIC_DECODE", raising=False)
    model = _converted(tiny_model_dir, device="cuda")
    ids, mask = _batch(model.config.vocab_size)
    ids, mask = ids.cuda(), mask.cuda()
    want = _generate(model, ids, mask, 48, **GREEDY)  # not installed yet: transformers' loop
    assert model not in _DECODERS
    got = _generate(install_static_generate(model), ids, mask, 48, **GREEDY)
    assert model in _DECODERS and _DECODERS[model]._graph is not None
    assert torch.equal(got, want)


def test_a_compiled_step_with_a_graph_break_in_every_layer_compiles_every_layer(monkeypatch) -> None:
    """On CUDA the fused Triton step breaks dynamo's graph inside each layer's attention, so dynamo compiles every
    decoder layer's frames separately, once per layer; past its default recompile limit (8) the other layers ran
    eagerly (measured on an H200: 'recompile_limit (8)' on layer 8 of 32). The decoder raises the limit for its
    calls: with a graph break injected into each layer's attention step (as the Triton launch makes one), a
    10-layer model compiles without reaching the limit and steps as the uncompiled decoder does."""
    import transformers
    from torch._dynamo.utils import counters

    from lolcats_cli.core.decode import static_decode
    from lolcats_cli.core.model.convert import convert_model

    attend = static_decode.StaticHybridLayer.attend

    def breaking(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(static_decode.StaticHybridLayer, "attend", breaking)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    convert_model(model, feature_map="hedgehog", feature_map_params={"feature_dim": 8}, window="terrace",
                  window_params={"size": 4, "sinks": 2}, decay=True, mode="student")  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    plain = StaticDecoder(model, 2, graph=False, triton=False, compiler="")
    compiled = StaticDecoder(model, 2, graph=False, triton=False, compiler="aot_eager")
    with torch.inference_mode():
        for token in (5, 9, 11, 2):
            want = plain.step(torch.tensor([token, 7])).clone()
            torch.testing.assert_close(compiled.step(torch.tensor([token, 7])), want, rtol=1e-5, atol=1e-5)
    assert sum(counters["graph_break"].values()) >= 10  # the injected break was met in every layer
    hit = [reason for reason in counters["unimplemented"] if "recompile limit" in reason.lower()]
    assert not hit, hit[0].splitlines()[0]
