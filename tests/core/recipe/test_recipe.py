"""Recipes: every shipped recipe validates, errors come all at once with key paths, overrides, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lolcats_cli.core.recipe.recipe import (
    Recipe,
    apply_overrides,
    load_recipe,
    save_resolved,
    shipped_recipes,
    write_versions,
)
from lolcats_cli.core.data.data import resolve_template
from lolcats_cli.core.recipe.recipe_files import recipes_dir
from lolcats_cli.errors import ConfigError

from conftest import REPO  # tests/ is on sys.path (rootdir conftest)

RECIPE_FILES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_folder_is_found_and_complete():
    assert recipes_dir() is not None
    names = set(shipped_recipes())
    assert {"smollm2-135m", "llama-3.1-8b", "llama-3-8b", "mistral-7b-v0.1", "llama-3.1-70b", "llama-3.1-405b"} <= names
    assert len(names) == len(RECIPE_FILES)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    # by name too, and the file opens with the command that runs it
    assert load_recipe(path.relative_to(REPO / "recipes").with_suffix("").as_posix()) == recipe
    head = path.read_text().split("\n\n")[0]
    assert all(line.startswith("#") for line in head.splitlines())
    assert f"lolcats transfer --recipe recipes/{path.name} --output runs/" in head
    assert "Needs:" in head


def test_paper_recipes_match_the_paper():
    r = load_recipe("llama-3.1-8b")
    assert (r.attention.feature_map, r.attention.feature_map_params, r.attention.window) == ("hedgehog", {"feature_dim": 64}, "terrace")
    assert r.attention.window_params == {"size": 64, "sinks": 4}  # the paper's window plus 4 attention sinks
    # the paper's hedgehog + terrace, plus what benchmarks/quality.py showed works: the gated, decaying branch
    assert (r.attention.linear_gate, r.attention.decay) == (True, True)
    assert (r.transfer.lr, r.transfer.mse_weight, r.transfer.batch_size, r.transfer.grad_accum, r.transfer.epochs) == (1e-2, 1000.0, 1, 8, 2)
    assert (r.transfer.scheduler, r.transfer.plateau_factor, r.transfer.plateau_patience, r.transfer.eval_every) == ("plateau", 0.1, 10, 100)
    assert (r.data.dataset, r.data.seq_len, r.data.holdout) == ("yahma/alpaca-cleaned", 1024, 200)
    # the paper's alpaca prompt for its dataset's columns, and plain text for a user's .txt file (no override)
    assert resolve_template(r.data, ["instruction", "input", "output"]) == "alpaca"
    assert resolve_template(r.data, ["text"]) == "text"
    assert (r.finetune.lr, r.finetune.lora.rank, r.finetune.lora.alpha) == (1e-4, 8, 16.0)
    big = load_recipe("llama-3.1-405b")
    assert (big.transfer.block_size, big.finetune.lora.rank) == (9, 4)
    assert load_recipe("llama-3.1-70b").transfer.block_size is None
    small = load_recipe("smollm2-135m")
    assert (small.model.name, small.data.dataset, small.data.seq_len, small.transfer.max_steps) == ("smollm2-135m", "pydoc", 512, 200)
    assert (small.attention.window_params, small.attention.linear_gate, small.attention.decay) == (
        {"size": 64, "sinks": 4}, True, True
    )
    gpu = load_recipe("smollm2-135m-gpu")
    assert (gpu.data.seq_len, gpu.transfer.batch_size, gpu.attention.decay) == (4096, 2, True)
    assert (gpu.transfer.max_tokens, gpu.finetune.max_tokens) == (4_500_000, 3_500_000)
    assert Recipe().attention.decay is False  # a recipe without the key: the paper's branch, no decay


def test_defaults_are_the_papers():
    r = Recipe()
    assert (r.transfer.lr, r.transfer.weight_decay, r.transfer.grad_clip, r.transfer.attn_ce_weight) == (1e-2, 0.0, 1.0, 0.0)
    assert (r.finetune.lr, r.finetune.lora.targets, r.finetune.mask_prompt) == (1e-4, ["q_proj", "k_proj", "v_proj", "o_proj"], True)
    assert (r.model.dtype, r.attention.layers, r.data.num_eval_sequences) == ("auto", "all", 16)


BAD = {
    "modle": {},
    "model": {"dtype": "fp32", "trust_remote_code": "yes"},
    "attention": {"layers": [0, "a", -1], "feature_map_params": 3},
    "data": {"seq_len": 1, "template": "alpca", "holdout": True, "max_samples": 1.5},
    "transfer": {"lr": "fast", "lrr": 1, "grad_accum": 0, "scheduler": "platau", "max_steps": "x"},
    "finetune": {"lora": {"rank": 0, "targets": "q_proj", "dropout": 1.0}},
}


def test_a_bad_recipe_reports_every_error_at_once():
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(BAD)
    errors = info.value.errors
    expected = [
        "modle: unknown key; did you mean 'model'?",
        "model.dtype: invalid choice 'fp32'",
        "model.trust_remote_code: expected true or false, got 'yes'",
        "attention.layers[1]: expected an integer, got 'a'",
        "attention.layers[2]: must be >= 0, got -1",
        "attention.feature_map_params: expected a mapping, got 3",
        "data.seq_len: must be >= 2, got 1",
        "data.template: invalid choice 'alpca'; did you mean 'alpaca'?",
        "data.holdout: expected an integer, got True",
        "data.max_samples: expected an integer or null, got 1.5",
        "transfer.lrr: unknown key; did you mean 'lr'? valid keys: lr, weight_decay",
        "transfer.lr: expected a number, got 'fast'",
        "transfer.grad_accum: must be >= 1, got 0",
        "transfer.scheduler: invalid choice 'platau'; did you mean 'plateau'? choices: 'plateau', 'constant', 'cosine'",
        "transfer.max_steps: expected an integer or null, got 'x'",
        "finetune.lora.rank: must be >= 1, got 0",
        "finetune.lora.targets: expected a list of strings, got 'q_proj'",
        "finetune.lora.dropout: must be < 1, got 1.0",
    ]
    for text in expected:
        assert any(e.startswith(text) for e in errors), f"missing {text!r} in {errors}"
    assert len(errors) == len(expected)
    assert str(info.value).startswith(f"{len(expected)} problems:")


def test_types_are_strict_but_ints_widen_to_floats():
    r = Recipe.from_dict({"transfer": {"lr": 1, "grad_clip": None, "max_tokens": 10}, "attention": {"layers": [3, 1]}})
    assert r.transfer.lr == 1.0 and isinstance(r.transfer.lr, float)
    assert r.transfer.grad_clip is None and r.attention.layers == [3, 1]
    for bad in ({"transfer": {"epochs": 2.0}}, {"transfer": {"epochs": True}}, {"model": {"name": 3}}):
        with pytest.raises(ConfigError):
            Recipe.from_dict(bad)
    with pytest.raises(ConfigError, match="attention.layers: expected 'all' or a list of integers, got 'al'; did you mean 'all'"):
        Recipe.from_dict({"attention": {"layers": "al"}})
    with pytest.raises(ConfigError, match="repeated layer indices"):
        Recipe.from_dict({"attention": {"layers": [1, 1]}})
    with pytest.raises(ConfigError, match="recipe: expected a mapping"):
        Recipe.from_dict(["model"])  # type: ignore[arg-type]


def test_overrides():
    base = Recipe().to_dict()
    d = apply_overrides(base, ["transfer.lr=1e-3", "attention.layers=[0,1]", "model.revision=null",
                               'model.name="meta-llama/Llama-3.1-8B"', "attention.feature_map_params.feature_dim=32",
                               "finetune.lora.targets=[q_proj, v_proj]", "output.dir=runs/x"])
    r = Recipe.from_dict(d)
    assert (r.transfer.lr, r.attention.layers, r.model.revision, r.model.name) == (1e-3, [0, 1], None, "meta-llama/Llama-3.1-8B")
    assert r.attention.feature_map_params == {"feature_dim": 32}
    assert (r.finetune.lora.targets, r.output.dir) == (["q_proj", "v_proj"], "runs/x")
    assert base["transfer"]["lr"] == 1e-2  # the input is not modified
    # switching the feature map drops the old map's params; setting both keeps them
    assert apply_overrides(base, ["attention.feature_map=taylor"])["attention"]["feature_map_params"] == {}
    both = apply_overrides(base, ["attention.feature_map=taylor", "attention.feature_map_params={proj_dim: 8}"])
    assert both["attention"]["feature_map_params"] == {"proj_dim": 8}
    implicit = apply_overrides({"attention": {"feature_map_params": {"feature_dim": 64}}}, ["attention.feature_map=elu"])
    assert implicit["attention"]["feature_map_params"] == {}  # the recipe's map was the default, hedgehog
    same = apply_overrides(base, ["attention.window=terrace"])
    assert same["attention"]["window_params"] == {"size": 64}  # same name: params kept


def test_bad_overrides_are_all_reported_with_suggestions():
    with pytest.raises(ConfigError) as info:
        apply_overrides(Recipe().to_dict(), ["transfer.lrr=1", "nope", "transfer.lr.x=1", "dta.seq_len=4", "data.seq_len=[1"])
    errors = info.value.errors
    assert errors[0].startswith("transfer.lrr: unknown key; did you mean 'lr'? valid keys:")
    assert errors[1].startswith("override 'nope': expected KEY=VALUE")
    assert errors[2] == "transfer.lr: is a number, it has no key 'x'"
    assert errors[3].startswith("dta: unknown key; did you mean 'data'?")
    assert errors[4].startswith("data.seq_len: cannot parse value '[1'")
    with pytest.raises(ConfigError, match="transfer.lr: expected a number, got 'fast'"):
        load_recipe("smollm2-135m", ["transfer.lr=fast"])


def test_load_recipe_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown recipe 'llama-3.1-8'; did you mean 'llama-3.1-8b'"):
        load_recipe("llama-3.1-8")
    with pytest.raises(ConfigError, match="recipe file not found: nowhere/x.yaml"):
        load_recipe("nowhere/x.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_recipe(scalar)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_recipe(empty) == Recipe()


def test_yaml_reads_exponent_floats(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("transfer:\n  lr: 1e-3\nfinetune:\n  lr: 5E-5\n  max_tokens: 1000\n")
    r = load_recipe(path)
    assert (r.transfer.lr, r.finetune.lr, r.finetune.max_tokens) == (1e-3, 5e-5, 1000)
    path.write_text("model:\n  trust_remote_code: yes\nattention:\n  window: none\n")  # YAML 1.2: yes is a string
    with pytest.raises(ConfigError, match="model.trust_remote_code: expected true or false, got 'yes'"):
        load_recipe(path)
    assert load_recipe(path, ["model.trust_remote_code=true"]).attention.window == "none"


def test_resolved_dump_round_trips(tmp_path: Path):
    recipe = load_recipe("llama-3.1-405b", ["transfer.lr=3e-4", "attention.layers=[2, 0]", "finetune.lr=1e-05"])
    path = save_resolved(recipe, tmp_path / "run")
    assert path == tmp_path / "run" / "recipe.resolved.yaml"
    assert path.read_text().startswith("# Resolved recipe")
    assert load_recipe(path) == recipe
    assert yaml.safe_load(path.read_text()) == recipe.to_dict()


def test_write_versions(tmp_path: Path):
    plugins = [{"kind": "feature_map", "name": "hedgehog", "distribution": "lolcats", "version": "0.1.0"}]
    path = write_versions(tmp_path, plugins)
    data = json.loads(path.read_text())
    for k in ("python", "lolcats", "torch", "transformers", "peft", "datasets"):
        assert k in data
    assert data["plugins"] == plugins and data["lolcats"]
