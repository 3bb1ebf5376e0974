"""The copy-me third-party plugin (plugins/lolcats-example-plugin), installed for real with pip: listed by
``lolcats plugins --json`` and buildable by name, exactly like a built-in.

pip installs it into a temporary folder (the session fixture ``example_plugin_site`` in conftest.py), never into
the running environment; each check runs in a fresh interpreter with that folder on PYTHONPATH, where
importlib.metadata finds its entry points as it finds those of any installed distribution.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

DIST = "lolcats-example-plugin"


def with_plugin(site: Path, *argv: str, **env: str) -> str:
    """The stdout of ``python ARGV`` run with ``site`` first on PYTHONPATH (and ``env`` set); it must succeed."""
    path = os.pathsep.join([str(site), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    done = subprocess.run([sys.executable, *argv], env={**os.environ, "PYTHONPATH": path, **env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_code(site: Path, code: str, *args: str) -> dict:
    """What ``code`` (run with the plugin on PYTHONPATH, ``args`` in sys.argv[1:]) prints as its last line, as JSON."""
    return json.loads(with_plugin(site, "-c", textwrap.dedent(code), *args).splitlines()[-1])


def test_pip_put_the_package_and_its_entry_points_in_the_folder(example_plugin_site: Path) -> None:
    assert (example_plugin_site / "lolcats_example_plugin" / "__init__.py").is_file()
    [info] = example_plugin_site.glob("lolcats_example_plugin-*.dist-info")
    assert "softplus = lolcats_example_plugin:Softplus" in (info / "entry_points.txt").read_text()


def test_listed_by_the_cli_as_json(example_plugin_site: Path) -> None:
    rows = json.loads(with_plugin(example_plugin_site, "-m", "lolcats_cli", "plugins", "--json"))
    assert {"kind": "feature_map", "name": "softplus", "distribution": DIST, "version": "0.1.0",
            "clashes_with": []} in rows


def test_buildable_by_name(example_plugin_site: Path) -> None:
    got = run_code(example_plugin_site, """
        import json, torch, lolcats_example_plugin
        from lolcats_cli.core.model import registry

        fm = registry.build_feature_map("softplus", num_heads=4, head_dim=16, params={"feature_dim": 8})
        y = fm(torch.randn(2, 4, 5, 16))
        print(json.dumps({"module": type(fm).__module__, "file": lolcats_example_plugin.__file__,
                          "feature_dim": fm.feature_dim, "shape": list(y.shape), "positive": bool((y > 0).all())}))
    """)
    assert got.pop("file").startswith(str(example_plugin_site))  # the temporary install, not another copy
    assert got == {"module": "lolcats_example_plugin", "feature_dim": 8, "shape": [2, 4, 5, 8], "positive": True}


def test_env_var_can_leave_it_out(example_plugin_site: Path) -> None:
    got = run_code(example_plugin_site, f"""
        import json, os
        from lolcats_cli.core.model import registry
        from lolcats_cli.errors import PluginError

        os.environ[registry.ENV_VAR] = ""
        try:
            registry.get_feature_map("softplus")
            left_out = None
        except PluginError as e:
            left_out = str(e)
        os.environ[registry.ENV_VAR] = "{DIST}"
        print(json.dumps({{"left_out": left_out, "named": registry.get_feature_map("softplus").__name__}}))
    """)
    assert f"from distribution '{DIST}', which LOLCATS_PLUGINS='' leaves out" in got["left_out"]
    assert got["named"] == "Softplus"


def test_usable_by_name_in_a_conversion(example_plugin_site: Path, tiny_model_dir: Path) -> None:
    """A third-party feature map converts a real model by name, trains and generates like a built-in."""
    got = run_code(example_plugin_site, """
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        from lolcats_cli.core.model.convert import convert_model, describe, linearized_layers

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        convert_model(model, feature_map="softplus", feature_map_params={"feature_dim": 8}, window="sliding",
                      window_params={"size": 4})
        layers = [m for _, m in linearized_layers(model)]
        ids = torch.randint(0, model.config.vocab_size, (1, 24))
        model(input_ids=ids, labels=ids).loss.backward()
        out = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
        print(json.dumps({"feature_map": describe(model)["feature_map"],
                          "modules": sorted({type(m.feature_map_q).__module__ for m in layers}),
                          "grads": all(m.feature_map_q.weight.grad is not None for m in layers),
                          "generated": list(out.shape)}))
    """, str(tiny_model_dir))
    assert got == {"feature_map": "softplus", "modules": ["lolcats_example_plugin"], "grads": True,
                   "generated": [1, 12]}
