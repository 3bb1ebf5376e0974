"""The kernel seam end to end: a kernel registered here (one small class) is picked, by priority or by
``LOLCATS_KERNEL``, and runs a converted model's forward, prefill and decode steps; bad choices fail loudly."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from lolcats_cli.core.model.convert import attention_parameters, convert_model, linearized_layers  # noqa: E402
from lolcats_cli.errors import ConfigError  # noqa: E402
from lolcats_cli.hf_compat import cache_kwarg  # noqa: E402
from lolcats_cli.kernels import ENV_VAR, KERNELS, Kernel, hybrid_attention_naive, register_kernel  # noqa: E402
from lolcats_cli.kernels import registry  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
pytestmark = pytest.mark.usefixtures("one_thread")


class ToyKernel(Kernel):
    """The naive reference under another name, counting the calls of each form it runs."""

    name = "toy"

    def __init__(self, priority: int = 100, on: str | None = None) -> None:
        self.priority, self.on = priority, on
        self.calls = {"sequence": 0, "step": 0}

    def available(self, device: torch.device) -> bool:
        return self.on is None or device.type == self.on

    def sequence(self, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        self.calls["sequence"] += 1
        return hybrid_attention_naive(*args, **kwargs)

    def step(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.calls["step"] += 1
        return super().step(*args, **kwargs)


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """KERNELS and the remembered automatic choices as they were after the test; no LOLCATS_KERNEL."""
    monkeypatch.setattr(registry, "_auto", {})
    monkeypatch.setattr(registry, "KERNELS", dict(KERNELS))
    monkeypatch.delenv(ENV_VAR, raising=False)


def _model(sinks: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=128, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    convert_model(model, feature_map="hedgehog", feature_map_params={"feature_dim": 16}, window="terrace",
                  window_params={"size": 4, "sinks": sinks}, mode="student", linear_gate=True)  # fmt: skip
    with torch.no_grad():  # "trained" parameters: the gate open, both branches weigh in
        for name, p in attention_parameters(model).items():
            p.add_(1.6 if name.endswith("linear_logits") else torch.randn(p.shape) * 0.3)
    return model


def _forward_and_decode(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one full forward, and of a prefill of 7 tokens then steps of 1 and 4 through one cache."""
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache, outs = DynamicCache(), []
        for a, b in [(0, 7), (7, 8), (8, 12)]:
            kwargs = {cache_kwarg(model): cache}
            outs.append(model(ids[:, a:b], attention_mask=mask[:, :b], use_cache=True, **kwargs).logits)
    return full, torch.cat(outs, dim=1)


@pytest.mark.parametrize("how", ["priority", "env"])
def test_a_registered_kernel_runs_forward_prefill_and_decode(
    how: str, clean_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A left-padded batch: the toy kernel gives the default kernel's logits, and ran every form."""
    model = _model()
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1: three leading pads
    ref_full, ref_decode = _forward_and_decode(model, ids, mask)  # the automatic choice: chunked

    toy = register_kernel(ToyKernel(priority=100 if how == "priority" else -1))
    if how == "env":
        monkeypatch.setenv(ENV_VAR, "toy")
    assert all(layer.kernel is toy for _, layer in linearized_layers(model))
    full, decoded = _forward_and_decode(model, ids, mask)
    torch.testing.assert_close(full, ref_full, **TOL)
    torch.testing.assert_close(decoded, ref_decode, **TOL)
    layers = len(linearized_layers(model))
    assert toy.calls["sequence"] == 2 * layers  # the full forward and the prefill, per layer
    assert toy.calls["step"] == 2 * layers  # two decode calls, per layer


def test_a_kernel_set_on_the_layer_beats_the_environment(
    clean_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    toy = register_kernel(ToyKernel(priority=-1))
    monkeypatch.setenv(ENV_VAR, "chunked")
    model = _model()
    for _, layer in linearized_layers(model):
        layer.kernel = "toy"
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 9)))
    assert toy.calls["sequence"] == len(linearized_layers(model))
    for _, layer in linearized_layers(model):
        layer.kernel = None
        assert layer.kernel is KERNELS["chunked"]


def test_unavailable_kernels_are_skipped_and_refused(clean_registry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    register_kernel(ToyKernel(priority=100, on="cuda"))
    assert registry.auto_kernel("cpu").name == "chunked"
    monkeypatch.setenv(ENV_VAR, "toy")
    with pytest.raises(ConfigError, match="'toy' is not available on cpu"):
        registry.select_kernel(None, "cpu")


def test_unknown_kernel_names_fail_with_a_suggestion(clean_registry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = linearized_layers(_model())[0][1]
    with pytest.raises(ConfigError, match="'chunkd' is not an attention kernel.*chunked"):
        layer.kernel = "chunkd"
    with pytest.raises(ConfigError, match="must be a kernel name or a Kernel"):
        layer.kernel = hybrid_attention_naive  # type: ignore[assignment]
    monkeypatch.setenv(ENV_VAR, "navie")
    with pytest.raises(ConfigError, match="'navie' is not an attention kernel.*naive"):
        layer(torch.zeros(1, 3, 64), position_embeddings=(torch.ones(1, 3, 16), torch.zeros(1, 3, 16)))


def test_the_recipe_key_picks_the_kernel_of_every_layer(tiny_model_dir) -> None:
    from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides
    from lolcats_cli.core.runs.workspace import check_plugins, load_converted_model

    def recipe(kernel: str) -> Recipe:
        return Recipe.from_dict(apply_overrides(Recipe().to_dict(), [f"model.name={tiny_model_dir}",
                                                                     f"attention.kernel={kernel}"]))

    model, _, _ = load_converted_model(recipe("naive"), torch.device("cpu"))
    assert {layer.kernel.name for _, layer in linearized_layers(model)} == {"naive"}
    with pytest.raises(ConfigError, match="attention.kernel: 'chunkd' is not an attention kernel; did you mean 'chunked'"):
        check_plugins(recipe("chunkd"))
