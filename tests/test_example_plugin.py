"""The copy-me third-party plugin (plugins/lolcats-example-plugin), installed for real with pip: listed by
``lolcats plugins --json`` and buildable by name, exactly like a built-in.

Installs it into the current environment once (editable, no deps); skipped when it is already there.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lolcats_cli.core import registry
from lolcats_cli.errors import PluginError

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins" / "lolcats-example-plugin"
DIST = "lolcats-example-plugin"


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(PLUGIN_DIR)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"installing {PLUGIN_DIR} failed:\n{done.stderr[-2000:]}")
        importlib.invalidate_caches()
    if str(PLUGIN_DIR) not in sys.path:  # an editable install made now is only on sys.path of new interpreters
        sys.path.append(str(PLUGIN_DIR))
    registry.refresh()


def test_listed_by_the_cli_as_json() -> None:
    out = subprocess.run([sys.executable, "-m", "lolcats_cli", "plugins", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert {"kind": "feature_map", "name": "softplus", "distribution": DIST, "version": "0.1.0",
            "clashes_with": []} in rows


def test_buildable_by_name() -> None:
    import torch

    fm = registry.build_feature_map("softplus", num_heads=4, head_dim=16, params={"feature_dim": 8})
    assert type(fm).__module__ == "lolcats_example_plugin" and fm.feature_dim == 8
    y = fm(torch.randn(2, 4, 5, 16))
    assert y.shape == (2, 4, 5, 8) and bool((y > 0).all())


def test_env_var_can_leave_it_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.ENV_VAR, "")
    with pytest.raises(PluginError, match=f"from distribution '{DIST}', which LOLCATS_PLUGINS='' leaves out"):
        registry.get_feature_map("softplus")
    monkeypatch.setenv(registry.ENV_VAR, DIST)
    assert registry.get_feature_map("softplus").__name__ == "Softplus"


def test_usable_by_name_in_a_conversion(tiny_model_dir) -> None:
    """A third-party feature map converts a real model by name, trains and generates like a built-in."""
    import torch
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.convert import convert_model, describe, linearized_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    convert_model(model, feature_map="softplus", feature_map_params={"feature_dim": 8}, window="sliding",
                  window_params={"size": 4})
    assert describe(model)["feature_map"] == "softplus"
    assert all(type(m.feature_map_q).__module__ == "lolcats_example_plugin" for _, m in linearized_layers(model))
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.feature_map_q.weight.grad is not None for _, m in linearized_layers(model))
    out = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
