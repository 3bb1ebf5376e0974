"""`lolcats export`: adapter and hf exports of a real transfer run and a real finetune run (tiny random Llama).

Both formats must reload to the run's logits; the hf export must load and generate in a Python process where
lolcats is not importable (``python -I -S`` with only site-packages on the path: no editable-install hooks),
its ``generate()`` through the bundled static decode loop too; an adapter on the wrong base model fails naming
both; no pickle is ever written.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lolcats_cli.core.export.export import ADAPTER_CONFIG, export_run, load_adapter_export
from lolcats_cli.core.export.export_hf import bundle_modules, flat_name, write_code
from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides
from lolcats_cli.core.runs.workspace import open_run
from lolcats_cli.errors import LolcatsError, ModelError, PluginError
from lolcats_cli.kernels import KERNELS

PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl")
TOL = 1e-5  # fp32, same kernels: the exports reproduce the run up to summation order


def _recipe(model_dir: Path) -> Recipe:
    overrides = [
        f"model.name={model_dir}", "data.dataset=pydoc", "data.seq_len=96", "data.holdout=4",
        "data.num_eval_sequences=1", "data.max_samples=12", "transfer.batch_size=1", "transfer.grad_accum=1",
        "transfer.max_steps=2", "transfer.eval_every=2", "transfer.lr=0.01", "attention.window_params.size=8",
        "attention.window_params.sinks=2", "attention.decay=true",
    ]  # a window of 8 keys and 2 sinks: most of every 96-token sequence goes through the (decayed) linear branch
    return Recipe.from_dict(apply_overrides(Recipe().to_dict(), overrides))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """A transfer run and a finetune run on top of it (LoRA with a large lr, so merging visibly matters)."""
    from lolcats_cli.core.train.finetune import run_finetune
    from lolcats_cli.core.train.transfer import run_transfer

    root = tmp_path_factory.mktemp("export-runs")
    run_transfer(_recipe(tiny_model_dir), root / "transfer", device="cpu")
    run_finetune(root / "transfer", root / "finetune", ["finetune.max_steps=2", "finetune.eval_every=2",
                                                        "finetune.lr=0.01"], device="cpu")
    return {"transfer": root / "transfer", "finetune": root / "finetune"}


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, tiny_model_dir, example_plugin) -> Path | None:
    """A transfer run with the third-party example feature map (softplus), a sliding window and only layer 1
    converted (the plugin comes from the temporary install of conftest.py's ``example_plugin``); None when
    the plugin is still not there."""
    from lolcats_cli.core.model import registry
    from lolcats_cli.core.train.transfer import run_transfer

    if "softplus" not in {p.name for p in registry.list_plugins("feature_map")}:
        return None
    run = tmp_path_factory.mktemp("export-plugin-run") / "transfer"
    extra = ["attention.feature_map=softplus", "attention.window=sliding", "attention.layers=[1]",
             "transfer.max_steps=1", "attention.linear_gate=true", "transfer.lr=0.3"]  # the gate opens a bit
    recipe = Recipe.from_dict(apply_overrides(_recipe(tiny_model_dir).to_dict(), extra))
    run_transfer(recipe, run, device="cpu")
    return run


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run_logits(runs, ids) -> dict[str, torch.Tensor]:
    out = {}
    for name, run in runs.items():
        _, model, _ = open_run(run, "cpu")
        with torch.no_grad():
            out[name] = model(input_ids=ids, use_cache=False).logits
    assert (out["transfer"] - out["finetune"]).abs().max() > 100 * TOL, "the finetune run must differ"
    return out


def _assert_no_pickle(folder: Path) -> None:
    found = [str(p) for pattern in PICKLES for p in folder.rglob(pattern)]
    assert found == [], found


@pytest.mark.parametrize("kind", ["transfer", "finetune"])
def test_adapter_export_reloads_to_the_run_logits(runs, run_logits, ids, kind, tmp_path) -> None:
    out = export_run(runs[kind], tmp_path / "adapter", "adapter")
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    expected = {ADAPTER_CONFIG, "attention.safetensors"}
    if kind == "finetune":
        expected |= {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert names == expected
    _assert_no_pickle(out)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["attention"]["feature_map"] == "hedgehog" and config["attention"]["layers"] == [0, 1]
    assert config["attention"]["window_params"] == {"size": 8, "sinks": 2}
    assert {(p["kind"], p["name"], p["distribution"]) for p in config["plugins"]} == {
        ("feature_map", "hedgehog", "lolcats"), ("window", "terrace", "lolcats")}
    assert config["base_model"]["architecture"]["num_hidden_layers"] == 2 and config["lora"] == (kind == "finetune")

    model = load_adapter_export(out, device="cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, run_logits[kind], atol=TOL, rtol=TOL)


def test_adapter_on_the_wrong_base_model_fails_naming_both(runs, tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    from conftest import build_tiny_model

    out = export_run(runs["transfer"], tmp_path / "adapter", "adapter")
    other = build_tiny_model(tmp_path / "wider", tiny_tokenizer, num_hidden_layers=3, num_attention_heads=8)
    with pytest.raises(ModelError) as err:
        load_adapter_export(out, base_model=str(other))
    message = str(err.value)
    assert str(other) in message and str(out) in message
    assert "num_hidden_layers 2 vs 3" in message and "num_attention_heads 4 vs 8" in message


WITHOUT_LOLCATS = r"""
import json, os, sys
cfg = json.loads(sys.argv[1])
sys.path[:] = [p for p in sys.path if "site-packages" not in p] + cfg["site"]
for name in ("lolcats_cli", "lolcats_example_plugin"):
    try:
        found = __import__(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{name} must not be importable here, found {found.__file__}")
"""

ISOLATED = WITHOUT_LOLCATS + r"""
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
ids, prompt = torch.tensor(cfg["ids"]), torch.tensor(cfg["ids"])[:1, :12]
out = {}
for name, folder in cfg["exports"].items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        out[name + ".logits"] = model(input_ids=ids, use_cache=False).logits
        gen = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        out[name + ".step_logits"] = torch.stack(gen.logits, dim=1)
        out[name + ".full_logits"] = model(input_ids=gen.sequences, use_cache=False).logits[:, 11:-1]
    cache = next(getattr(gen, f) for f in ("cache", "past_key_values") if getattr(gen, f, None) is not None)
    states = [layer for layer in cache.layers if type(layer).__name__ == "HybridLayer" and layer.state is not None]
    out[name + ".hybrid_layers"] = torch.tensor([len(states), len(cache.layers)])
    out[name + ".state_length"] = torch.tensor([layer.state.length for layer in states])
    print(name, type(model).__name__, repr(tokenizer.decode(gen.sequences[0, 12:])))
save_file({k: v.contiguous() for k, v in out.items()}, cfg["out"])
"""

STATIC = WITHOUT_LOLCATS + r"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(cfg["folder"], trust_remote_code=True, use_safetensors=True)
package = type(model).__module__.rpartition(".")[0]  # transformers' dynamic module of the folder
static = sys.modules[package + ".lolcats_core_decode_static_decode"]  # the bundled copy, not lolcats'
ids, mask = torch.tensor(cfg["ids"]), torch.tensor(cfg["mask"])
kwargs = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
out = {}
with torch.no_grad():
    os.environ["LOLCATS_STATIC_DECODE"] = "0"
    out["plain"] = model.generate(ids, **kwargs).tolist()
    os.environ["LOLCATS_STATIC_DECODE"] = "1"  # the CUDA default, on this CPU (eager static steps)
    model.generate(ids, num_beams=2, **{**kwargs, "max_new_tokens": 3, "min_new_tokens": 3})
    out["beams_ran_static"] = model in static._DECODERS  # beam search stays on transformers' loop
    out["static"] = model.generate(ids, **kwargs).tolist()
decoder = static._DECODERS.get(model)  # the static loop caches its decoder on the model
if decoder is not None:
    out["decoder"] = {"batch": decoder.batch, "length": decoder.layers[0].get_seq_length(),
                      "step": decoder.step_name, "module": type(decoder).__module__}
with open(cfg["out"], "w") as f:
    json.dump(out, f)
"""


def _run_without_lolcats(script: str, cfg: dict, tmp_path: Path) -> None:
    """Run ``script`` (json ``cfg`` as its argument) in a Python where neither lolcats nor the example plugin is
    importable; fails the test with its output when it fails."""
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    path = tmp_path / "isolated.py"
    path.write_text(script)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf-modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    env.pop("LOLCATS_STATIC_DECODE", None)
    # -I: no PYTHONPATH, no user site, no script or cwd on sys.path; -S: no .pth files (the editable install)
    done = subprocess.run([sys.executable, "-I", "-S", str(path), json.dumps({**cfg, "site": site})], check=False,
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]


def test_hf_export_loads_and_generates_without_lolcats(runs, plugin_run, run_logits, ids, tmp_path) -> None:
    run_logits = dict(run_logits)
    if plugin_run is not None:  # a third-party plugin's source is bundled too (and it is not importable there)
        runs = {**runs, "plugin": plugin_run}
        _, model, _ = open_run(plugin_run, "cpu")
        with torch.no_grad():
            run_logits["plugin"] = model(input_ids=ids, use_cache=False).logits
    exports = {name: export_run(run, tmp_path / f"hf-{name}", "hf") for name, run in runs.items()}
    if plugin_run is not None:
        assert (exports["plugin"] / "plugin_lolcats_example_plugin.py").is_file()
    for folder in exports.values():
        _assert_no_pickle(folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lolcats.LolcatsForCausalLM"
        assert config["model_type"] == "lolcats_llama" and "quantization_config" not in config
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert (folder / "generation_config.json").is_file()
        for kernel in KERNELS.values():  # every registered kernel ships, so LOLCATS_KERNEL works there too
            assert (folder / f"{flat_name(type(kernel).__module__)}.py").is_file(), kernel.name
        for source in folder.glob("*.py"):  # every import of lolcats_cli was rewritten to a bundled copy
            tree = ast.parse(source.read_text())
            imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
            named = [getattr(n, "module", None) or "" for n in imports] + [a.name for n in imports for a in n.names]
            assert not [m for m in named if m.startswith("lolcats_cli")], source.name

    cfg = {"exports": {k: str(v) for k, v in exports.items()}, "ids": ids.tolist(),
           "out": str(tmp_path / "isolated.safetensors")}
    _run_without_lolcats(ISOLATED, cfg, tmp_path)
    got = load_file(cfg["out"])
    for name in exports:
        torch.testing.assert_close(got[f"{name}.logits"], run_logits[name], atol=TOL, rtol=TOL)
        assert got[f"{name}.step_logits"].shape[1] == 24
        torch.testing.assert_close(got[f"{name}.step_logits"], got[f"{name}.full_logits"], atol=1e-4, rtol=1e-4)
        # the bundled runtime decoded with its constant-size state in every converted layer, whatever name
        # this transformers gives the cache argument
        config = json.loads((exports[name] / "config.json").read_text())
        converted = len(config["lolcats"]["layers"])
        assert got[f"{name}.hybrid_layers"].tolist() == [converted, config["num_hidden_layers"]]
        assert got[f"{name}.state_length"].tolist() == [12 + 24 - 1] * converted

    probe = subprocess.run([sys.executable, "-I", "-S", "-c", "import lolcats_cli"], check=False,
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'lolcats_cli'" in probe.stderr


def test_hf_export_generates_through_its_bundled_static_loop(runs, ids, tmp_path) -> None:
    """``LOLCATS_STATIC_DECODE=1`` on CPU: greedy ``generate()`` of a left-padded batch runs the bundled static
    loop (its decoder is cached on the model, stepped to the end) and gives transformers' loop's tokens."""
    folder = export_run(runs["transfer"], tmp_path / "hf", "hf")
    for module in ("core_decode_static_decode", "kernels_static", "kernels_triton_step"):
        assert (folder / f"lolcats_{module}.py").is_file(), module
    assert not (folder / "lolcats_core_model_convert.py").exists()  # the decode path needs no conversion code
    prompts = ids[:, :12].clone()
    mask = torch.ones_like(prompts)
    prompts[1, :5], mask[1, :5] = 0, 0  # the second row: 7 tokens, left-padded
    cfg = {"folder": str(folder), "ids": prompts.tolist(), "mask": mask.tolist(), "out": str(tmp_path / "out.json")}
    _run_without_lolcats(STATIC, cfg, tmp_path)
    got = json.loads(Path(cfg["out"]).read_text())
    assert not got["beams_ran_static"]
    assert got["decoder"].pop("module").endswith(".lolcats_core_decode_static_decode")  # the bundled copy
    assert got["decoder"] == {"batch": 2, "length": 12 + 20 - 1, "step": "torch"}  # stepped to the last token
    assert len(got["static"][0]) == 12 + 20 and got["static"] == got["plain"]


def test_export_refuses_to_replace_what_it_did_not_write(runs, tmp_path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("user data")
    with pytest.raises(LolcatsError, match="already exists"):
        export_run(runs["transfer"], precious, "adapter")
    with pytest.raises(LolcatsError, match="not a lolcats export"):
        export_run(runs["transfer"], precious, "adapter", overwrite=True)
    with pytest.raises(LolcatsError, match="would replace the run directory"):
        export_run(runs["transfer"], runs["transfer"].parent, "adapter", overwrite=True)
    with pytest.raises(LolcatsError, match="is not an export format"):
        export_run(runs["transfer"], tmp_path / "x", "gguf")  # type: ignore[arg-type]
    with pytest.raises(LolcatsError, match="--dtype: 'fp8' is not a weights dtype"):
        export_run(runs["transfer"], tmp_path / "x", "hf", dtype="fp8")
    with pytest.raises(LolcatsError, match="applies to --format hf only"):
        export_run(runs["transfer"], tmp_path / "x", "adapter", dtype="bfloat16")
    assert not (tmp_path / "x").exists()
    assert (precious / "notes.txt").read_text() == "user data"
    out = export_run(runs["transfer"], tmp_path / "again", "adapter")
    assert export_run(runs["finetune"], out, "adapter", overwrite=True) == out
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".*partial*"))


def test_third_party_plugin_source_is_bundled_with_rewritten_imports(example_plugin) -> None:
    bundle = bundle_modules(["lolcats_example_plugin"], {"lolcats_cli", "lolcats_example_plugin"})
    source = bundle.files["plugin_lolcats_example_plugin"]
    assert "from .lolcats_api import FeatureMap, FeatureMapParams" in source
    assert "lolcats_api" in bundle.files and "torch" in bundle.external
    for text in bundle.files.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1) and not (node.module or "").startswith("lolcats_cli"), ast.unparse(node)


def test_a_plugin_without_source_fails_clearly(tmp_path) -> None:
    from lolcats_cli.api import FeatureMap
    from lolcats_cli.builtins.windows import Terrace

    made_here = type("InlineMap", (FeatureMap,), {"__module__": "__main__"})
    with pytest.raises(PluginError, match="InlineMap.*no importable source file"):
        write_code(tmp_path, {}, None, made_here, Terrace, ("m", "f"))


def test_cli_prints_the_files_and_sizes(runs, tmp_path) -> None:
    import typer
    from typer.testing import CliRunner

    from lolcats_cli.cli.main import register_commands

    app = typer.Typer()
    register_commands(app, [("export", "export"), ("plugins", "plugins")])
    result = CliRunner().invoke(app, ["export", str(runs["finetune"]), "--out", str(tmp_path / "a"), "--format",
                                      "adapter"])
    assert result.exit_code == 0, result.output
    for name in ("lolcats_config.json", "attention.safetensors", "adapter_model.safetensors", "total"):
        assert name in result.output
    bad = CliRunner().invoke(app, ["export", str(runs["finetune"]), "--out", str(tmp_path / "b"), "--format", "onnx"])
    assert bad.exit_code == 2 and "onnx" in bad.output
