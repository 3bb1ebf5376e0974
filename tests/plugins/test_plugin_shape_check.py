"""A feature map with the wrong output shape fails at conversion, naming the plugin and its distribution."""

from __future__ import annotations

import pytest

from lolcats_cli.core.model.convert import convert_model, linearized_layers
from lolcats_cli.errors import PluginError

from plugin_sites import FM, Site  # tests/ is on sys.path (rootdir conftest)

MAPS = """
import torch
from lolcats_cli.api import FeatureMap

class _Base(FeatureMap):
    plugin_api_version = 2

    @property
    def feature_dim(self):
        return self.head_dim

class Transposed(_Base):  # (B, H, D, T): right only when T equals the head size
    def forward(self, x):
        return x.abs().transpose(-1, -2)

class Wider(_Base):  # twice the feature_dim it declares
    def forward(self, x):
        return torch.cat([x.abs(), x.abs()], dim=-1)

class Crashes(_Base):
    def forward(self, x):
        return x.abs().unflatten(-1, (2, 64))
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    from lolcats_cli.core.model import registry

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    Site(tmp_path).add("fake-bad-maps", "fake_bad_maps", MAPS, {FM: {
        "transposed": "fake_bad_maps:Transposed", "wider": "fake_bad_maps:Wider", "crashes": "fake_bad_maps:Crashes"}})
    yield
    registry.refresh()


@pytest.mark.parametrize(("name", "got"), [
    ("transposed", "returns (2, 4, 16, 5) for inputs of shape (2, 4, 5, 16)"),
    ("wider", "returns (2, 4, 5, 32) for inputs of shape (2, 4, 5, 16)"),
    ("crashes", "returns an error (RuntimeError: unflatten: Provided sizes [2, 64] don't multiply up to"),
])
def test_a_wrong_output_shape_fails_at_conversion_naming_the_plugin(site, tiny_model_dir, name, got) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # 4 heads of 16
    with pytest.raises(PluginError) as err:
        convert_model(model, feature_map=name)
    message = str(err.value)
    assert message.startswith(f"feature map {name!r} (distribution fake-bad-maps 1.2.3, fake_bad_maps:")
    assert got in message and "expected (2, 4, 5, 16), i.e. (batch, heads, positions, feature_dim=16)" in message
    assert "lolcats_cli.testing.check_feature_map" in err.value.hint and "fake-bad-maps authors" in err.value.hint
    assert linearized_layers(model) == []  # the model is left as it was


def test_built_in_maps_pass(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    for name in ("hedgehog", "elu", "taylor", "t2r"):
        model = convert_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), feature_map=name)
        assert len(linearized_layers(model)) == 2
