"""A feature map's persistent buffers (fixed random features, say) travel with its parameters: run checkpoints,
attention.safetensors, the adapter export, and every load."""

from __future__ import annotations

import logging

import pytest
import torch

from lolcats_cli.core.model.convert import attention_state_dict, linearized_layers, load_attention_state_dict
from lolcats_cli.core.runs.workspace import open_run
from lolcats_cli.core.train.checkpoint import load_tensors
from lolcats_cli.core.train.transfer import run_transfer

from plugin_sites import FM, Site  # tests/ is on sys.path (rootdir conftest)
from tiny_recipes import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RANDOM_FEATURES = """
import torch
from lolcats_cli.api import FeatureMap

class RandomFeatures(FeatureMap):
    plugin_api_version = 2

    def __init__(self, num_heads, head_dim, params):
        super().__init__(num_heads, head_dim, params)
        self.register_buffer("proj", torch.randn(head_dim, head_dim))  # fixed, drawn from the global RNG
        self.scale = torch.nn.Parameter(torch.ones(head_dim))

    @property
    def feature_dim(self):
        return self.head_dim

    def forward(self, x):
        return torch.nn.functional.softplus((x.float() @ self.proj) * self.scale).to(x.dtype)
"""


@pytest.fixture
def random_features(tmp_path, monkeypatch):
    from lolcats_cli.core.model import registry

    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    (tmp_path / "site").mkdir()
    Site(tmp_path / "site").add("fake-random-features", "fake_random_features", RANDOM_FEATURES,
                                {FM: {"randfeat": "fake_random_features:RandomFeatures"}})
    yield "randfeat"
    registry.refresh()


def _proj(model) -> torch.Tensor:
    return linearized_layers(model)[0][1].feature_map_q.proj


def test_buffers_are_saved_in_runs_and_checkpoints_and_restored_on_load(random_features, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(1)
    run_transfer(tiny_recipe(tiny_model_dir, "attention.feature_map=randfeat", "transfer.max_steps=2",
                             "transfer.eval_every=2"), run, device="cpu")
    saved = load_tensors(run / "attention.safetensors")
    key = "model.layers.0.self_attn.feature_map_q.proj"
    assert key in saved and "model.layers.1.self_attn.feature_map_k.proj" in saved
    checkpoint = next((run / "checkpoints").glob("step-*/trainable.safetensors"))
    assert torch.equal(load_tensors(checkpoint)[key], saved[key])

    torch.manual_seed(2)  # a fresh conversion draws other random features ...
    _, model, _ = open_run(run, torch.device("cpu"))
    assert torch.equal(_proj(model), saved[key])  # ... and loading puts the trained run's back

    from lolcats_cli.core.export.export import export_run, load_adapter_export

    export_run(run, tmp_path / "adapter", "adapter")
    torch.manual_seed(3)
    assert torch.equal(_proj(load_adapter_export(tmp_path / "adapter", device="cpu")), saved[key])


def test_weights_saved_without_buffers_keep_the_fresh_values_with_a_warning(random_features, tiny_model_dir, caplog):
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.model.convert import convert_model

    model = convert_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), feature_map="randfeat")
    state = attention_state_dict(model)
    assert "model.layers.0.self_attn.feature_map_q.proj" in state and "model.layers.0.self_attn.feature_map_q.scale" in state
    fresh = _proj(model).clone()
    old = {k: v for k, v in state.items() if not k.endswith(".proj")}  # as lolcats wrote them before
    with caplog.at_level(logging.WARNING, logger="lolcats_cli.core.model.convert"):
        load_attention_state_dict(model, old)
    assert torch.equal(_proj(model), fresh)
    assert "these weights hold no value for 4 feature-map buffer(s) (model.layers.0.self_attn.feature_map_k.proj" in caplog.text
    with pytest.raises(Exception, match="shape mismatch: model.layers.0.self_attn.feature_map_q.proj"):
        load_attention_state_dict(model, {**state, "model.layers.0.self_attn.feature_map_q.proj": torch.zeros(3)})
