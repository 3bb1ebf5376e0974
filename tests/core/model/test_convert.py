"""convert_model and LinearizedAttention on tiny random Llama, Mistral, Qwen2 and Qwen3 models (no downloads).

T = 24 with a window of 8 keeps both branches of the hybrid busy; Mistral and Qwen2 get a softmax sliding
window of 16 (< T) so the teacher's sliding-window path is exercised too.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lolcats_cli.core.model.convert import (  # noqa: E402
    LinearizedAttention,
    attention_parameters,
    attention_state_dict,
    convert_model,
    describe,
    freeze_for_transfer,
    linearized_layers,
    load_attention_state_dict,
    set_mode,
)
from lolcats_cli.core.model.linear_attention import softmax_attention  # noqa: E402
from lolcats_cli.errors import ConfigError, ModelError  # noqa: E402
from lolcats_cli.hf_compat import cache_kwarg  # noqa: E402

T = 24
SMALL = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
    vocab_size=128, max_position_embeddings=256,
)  # fmt: skip
PLUGINS = dict(feature_map="hedgehog", feature_map_params={"feature_dim": 16}, window="terrace",
               window_params={"size": 8})  # fmt: skip


def _config(arch: str, attn: str = "sdpa"):
    if arch == "llama":
        cfg = transformers.LlamaConfig(**SMALL)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**SMALL, sliding_window=16)
    elif arch == "qwen2":  # q/k/v biases; layer 1 uses a sliding window
        cfg = transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    else:  # qwen3: per-head q/k RMS norms
        cfg = transformers.Qwen3Config(**SMALL, head_dim=16)
    cfg._attn_implementation = attn
    return cfg


def _model(arch: str, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, attn)).eval()
    with torch.no_grad():  # random biases (zero by default) so Qwen2's q/k/v biases matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (batch, T), generator=torch.Generator().manual_seed(1))


ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


# --------------------------------------------------------------------------------------- (1) teacher


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_reproduces_original_logits(arch: str) -> None:
    model, ids = _model(arch), _ids()
    with torch.no_grad():
        ref = model(ids).logits
        convert_model(model, **PLUGINS, mode="teacher")
        out = model(ids).logits
    assert len(linearized_layers(model)) == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_teacher_honours_left_padding(arch: str, attn: str) -> None:
    model, ids = _model(arch, attn), _ids()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second sequence
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        convert_model(model, **PLUGINS, mode="teacher")
        out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["teacher", "student"])
def test_kv_cache_decode_matches_full_forward(mode: str) -> None:
    model, ids = _model("mistral"), _ids()
    convert_model(model, **PLUGINS, mode=mode)
    # The model's own cache keeps only Mistral's 16-key softmax window: right for the teacher, not the student.
    cache = transformers.DynamicCache(config=model.config) if mode == "teacher" else transformers.DynamicCache()
    with torch.no_grad():
        full = model(ids).logits
        model(ids[:, :20], **{cache_kwarg(model): cache}, use_cache=True)
        step = model(ids[:, 20:22], **{cache_kwarg(model): cache}, use_cache=True).logits
        step2 = model(ids[:, 22:23], **{cache_kwarg(model): cache}, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 20:22], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step2[:, 0], full[:, 22], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 8])
@pytest.mark.parametrize("padded", [False, True])
def test_softmax_attention_builds_masks_hf_leaves_out(sliding_window: int | None, padded: bool) -> None:
    """No mask with a window shorter than T, or a 2-D padding mask (flash-attention models)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 30, 16, generator=gen) for h in (4, 2, 2))
    pad = torch.ones(2, 30, dtype=torch.bool)
    pad[1, :3] = False
    y = softmax_attention(q, k, v, pad if padded else None, 0.25, sliding_window)
    i = torch.arange(30)
    allowed = i[None] <= i[:, None]
    if sliding_window:
        allowed &= i[None] > i[:, None] - sliding_window
    allowed = allowed & pad[:, None, None, :] if padded else allowed[None, None]
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~allowed, float("-inf"))
    ref = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    real = pad if padded else torch.ones_like(pad)
    torch.testing.assert_close(y.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- (2) student


@pytest.mark.parametrize("arch", ARCHS)
def test_student_forward_backward_reaches_attention_parameters(arch: str) -> None:
    model, ids = _model(arch), _ids()
    convert_model(model, **PLUGINS)
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    for i, layer in linearized_layers(model):
        for name, p in layer.attention_parameters().items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {i}: no gradient for {name}"
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None  # the projections still train


def test_student_chunked_matches_naive_kernel() -> None:
    model, ids = _model("qwen3"), _ids()
    convert_model(model, **PLUGINS)
    with torch.no_grad():
        chunked = model(ids).logits
        for _, layer in linearized_layers(model):
            layer.kernel = "naive"
        naive = model(ids).logits
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- (3) transfer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transfer_passes_teacher_on_and_trains_layers_independently(arch: str) -> None:
    model, ids = _model(arch), _ids()
    with torch.no_grad():
        ref = model(ids).logits
    convert_model(model, **PLUGINS, mode="transfer")
    trainable = freeze_for_transfer(model)
    assert {id(p) for p in trainable} == {id(p) for p in attention_parameters(model).values()}
    assert all(p.requires_grad == (id(p) in {id(q) for q in trainable}) for p in model.parameters())

    out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # the teacher is in the residual stream
    losses = [layer.transfer_loss for _, layer in linearized_layers(model)]
    for loss in losses:
        assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    assert not out.requires_grad  # nothing trainable lies on the residual path

    (l0, layer0), (l1, layer1) = linearized_layers(model)
    layer1.transfer_loss.backward(retain_graph=True)  # layer 1's loss does not reach layer 0's maps
    assert all(p.grad is None for p in layer0.attention_parameters().values())
    assert all(p.grad is not None for p in layer1.attention_parameters().values())
    model.zero_grad(set_to_none=True)
    sum(losses).backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == set(attention_parameters(model))


def test_transfer_attention_cross_entropy() -> None:
    model, ids = _model("mistral"), _ids()
    convert_model(model, **PLUGINS, mode="transfer")
    freeze_for_transfer(model)
    for _, layer in linearized_layers(model):
        layer.attn_ce_queries = 5
    model(ids)
    ces = [layer.transfer_ce for _, layer in linearized_layers(model)]
    assert all(ce is not None and torch.isfinite(ce) and ce > 0 for ce in ces)
    sum(ces).backward()
    assert all(p.grad is not None for p in attention_parameters(model).values())
    set_mode(model, "student")
    model(ids)
    assert all(layer.transfer_ce is None and layer.transfer_loss is None for _, layer in linearized_layers(model))


# --------------------------------------------------------------------------------- (4, 5) selection, errors


def test_layer_selection_converts_only_those_layers() -> None:
    model = _model("llama")
    convert_model(model, **PLUGINS, layers=[1])
    assert [i for i, _ in linearized_layers(model)] == [1]
    assert not isinstance(model.model.layers[0].self_attn, LinearizedAttention)
    assert describe(model) == {
        "feature_map": "hedgehog", "feature_map_params": {"feature_dim": 16, "eps": 1e-12}, "window": "terrace",
        "window_params": {"size": 8, "sinks": 0}, "layers": [1], "linear_gate": False, "decay": False, "delta_rule": False,
        "mode": "student",
        "model_type": "llama",
        "plugin_api_version": describe(model)["plugin_api_version"],
    }  # fmt: skip


def test_bad_layers_mode_and_double_conversion_are_errors() -> None:
    model = _model("llama")
    with pytest.raises(ConfigError) as err:
        convert_model(model, layers=[0, 0, 5, -1])
    assert "[5, -1]" in str(err.value) and "[0]" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'student'"):
        convert_model(model, mode="studnet")
    assert not linearized_layers(model)  # failed conversions leave the model untouched
    convert_model(model, **PLUGINS)
    with pytest.raises(ModelError, match="already converted"):
        convert_model(model)


def test_unsupported_architecture_lists_supported_ones() -> None:
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ModelError, match="'gpt2'.*llama, mistral, qwen2, qwen3"):
        convert_model(model)


# ------------------------------------------------------------------------------- (6, 7) state dicts, peft


def test_base_state_dict_keys_unchanged() -> None:
    model = _model("qwen3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_model(model, **PLUGINS)
    after = model.state_dict()
    new = set(after) - set(before)
    assert set(before) <= set(after)
    assert new == set(attention_parameters(model))
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(after[k].dtype == torch.float32 for k in new)


def test_attention_state_dict_round_trip_and_mismatch() -> None:
    a, b = convert_model(_model("llama"), **PLUGINS), convert_model(_model("llama"), **PLUGINS)
    with torch.no_grad():
        for p in attention_parameters(a).values():
            p.add_(torch.randn_like(p))
    sd = attention_state_dict(a)
    load_attention_state_dict(b, sd)
    assert all(torch.equal(sd[k], v) for k, v in attention_state_dict(b).items())

    other = convert_model(_model("llama"), **PLUGINS, layers=[0])
    with pytest.raises(ModelError, match="unexpected: model.layers.1"):
        load_attention_state_dict(other, sd)
    wider = convert_model(_model("llama"), **dict(PLUGINS, feature_map_params={"feature_dim": 8}))
    with pytest.raises(ModelError, match="shape mismatch"):
        load_attention_state_dict(wider, sd)


def test_peft_lora_targets_the_reused_projections() -> None:
    peft = pytest.importorskip("peft")
    model, ids = convert_model(_model("llama"), **PLUGINS), _ids()
    sd = attention_state_dict(model)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    assert isinstance(lora.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.Linear)
    assert torch.isfinite(lora(ids).logits).all()
    assert attention_state_dict(lora).keys() == sd.keys()  # portable across the peft wrapper
    load_attention_state_dict(lora, sd)


def test_set_mode_switches_every_layer() -> None:
    model = convert_model(_model("llama"), **PLUGINS)
    set_mode(model, "teacher")
    assert {layer.mode for _, layer in linearized_layers(model)} == {"teacher"}
    with pytest.raises(ModelError, match="no linearized layers"):
        set_mode(copy.deepcopy(_model("llama")), "teacher")
