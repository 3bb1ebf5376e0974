"""``attention.softmax_layers``: after stage 1 the K layers with the highest attention-transfer MSE (auto:K), or
named layers, stay ordinary softmax attention in every later step: finetune records them by index, eval says
which, the adapter export reloads without them, and a model with mixed layers decodes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from lolcats_cli.core.eval.evaluate import evaluate_run
from lolcats_cli.core.export.export import export_run, load_adapter_export
from lolcats_cli.core.model.convert import LinearizedAttention, linearized_layers
from lolcats_cli.core.model.softmax_layers import drop_layers, resolve_softmax_layers, worst_layers
from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides, load_recipe
from lolcats_cli.core.runs.workspace import open_run
from lolcats_cli.core.train.checkpoint import load_json
from lolcats_cli.core.train.finetune import run_finetune
from lolcats_cli.core.train.transfer import run_transfer
from lolcats_cli.errors import ConfigError
from lolcats_cli.hf_compat import DynamicCache, cache_kwarg

from conftest import build_tiny_model  # tests/ is on sys.path (rootdir conftest)
from tiny_recipes import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory, tiny_tokenizer):
    return build_tiny_model(tmp_path_factory.mktemp("three") / "model", tiny_tokenizer, num_hidden_layers=3, seed=3)


@pytest.fixture(scope="module")
def run(three_layers, tmp_path_factory):
    out = tmp_path_factory.mktemp("softmax-layers") / "transfer"
    run_transfer(tiny_recipe(three_layers, "attention.softmax_layers=auto:1"), out, device="cpu")
    return out


@pytest.mark.parametrize("value,message", [
    ("auto:x", "'auto:x' is not auto:K with K >= 1"),
    ("auto:0", "'auto:0' is not auto:K with K >= 1"),
    ([1, 1], "must be distinct layer indices"),
    ([2], r"\[2\] are not converted layers"),
])  # fmt: skip
def test_bad_values_are_refused_naming_the_fix(value, message) -> None:
    data = Recipe().to_dict()
    data["attention"].update(layers=[0, 1], softmax_layers=value)
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)
    assert Recipe.from_dict(apply_overrides(Recipe().to_dict(), ["attention.softmax_layers=auto:2"]))


def test_the_worst_layers_are_chosen_and_their_weights_dropped() -> None:
    rows = [{"layer": i, "mse_after": mse} for i, mse in enumerate([0.1, 0.5, 0.05, 0.7])]
    assert worst_layers(rows, 2) == [1, 3]
    state = {"model.layers.1.self_attn.window_logits": 1, "model.layers.10.self_attn.window_logits": 2}
    assert drop_layers(state, [1]) == {"model.layers.10.self_attn.window_logits": 2}
    with pytest.raises(ConfigError, match="needs the per-layer MSE of a finished transfer run"):
        resolve_softmax_layers("auto:1", None)


def test_auto_keeps_the_worst_transferred_layer_as_softmax(run) -> None:
    table = load_json(run / "metrics.json")["layers"]
    worst = max(table, key=lambda row: row["mse_after"])["layer"]
    assert {row["layer"] for row in table} == {0, 1, 2}  # stage 1 trained every layer
    recipe, model, _ = open_run(run, "cpu")
    assert recipe.attention.softmax_layers == "auto:1"
    assert [i for i, _ in linearized_layers(model)] == sorted({0, 1, 2} - {worst})
    assert not isinstance(model.model.layers[worst].self_attn, LinearizedAttention)

    ids = torch.randint(3, 400, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # softmax and hybrid layers in one cache decode as the full forward computes
        full = model(ids, use_cache=False).logits
        cache, outs = DynamicCache(), []
        for a, b in [(0, 30), (30, 31), (31, 60)]:
            outs.append(model(ids[:, a:b], use_cache=True, **{cache_kwarg(model): cache}).logits)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 60


def test_finetune_eval_and_export_keep_the_same_layers(run, tmp_path) -> None:
    worst = resolve_softmax_layers("auto:1", run)
    tuned = tmp_path / "finetune"
    run_finetune(run, tuned, ["finetune.max_steps=2", "finetune.eval_every=2"], device="cpu")
    assert load_recipe(tuned / "recipe.resolved.yaml").attention.softmax_layers == worst  # by index now
    _, model, _ = open_run(tuned, "cpu")
    assert sorted({0, 1, 2} - {i for i, _ in linearized_layers(model)}) == worst

    report = evaluate_run(tuned, contexts=(), passkey_lengths=(), device="cpu")
    assert report.softmax_layers == worst and json.loads(json.dumps(report.to_dict()))["softmax_layers"] == worst

    out = export_run(tuned, tmp_path / "adapter", "adapter")
    assert json.loads((out / "lolcats_config.json").read_text())["attention"]["layers"] == sorted({0, 1, 2} - set(worst))
    reloaded = load_adapter_export(out, device="cpu")
    ids = torch.randint(3, 400, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   atol=1e-5, rtol=1e-5)
