"""``attention.train_window_sizes``: each training batch runs one window size drawn from a list, in every layer;
evaluation runs the configured size; the draw follows torch's generator (the trainer seeds it per step)."""

from __future__ import annotations

import pytest
import torch

from lolcats_cli.core.model.convert import linearized_layers, set_mode
from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides, load_recipe
from lolcats_cli.core.train.finetune import run_finetune
from lolcats_cli.core.train.train_window import random_window
from lolcats_cli.core.train.transfer import run_transfer
from lolcats_cli.core.train.transfer_modes.common import TransferObjective
from lolcats_cli.errors import ConfigError

from tiny_converted import converted_model  # tests/ is on sys.path (rootdir conftest)
from tiny_recipes import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("value,message", [
    ("[]", "an empty list"),
    ("[0,64]", r"\[0\] are not positive integers"),
    ("[32,true]", r"train_window_sizes\[1\]: expected an integer, got True"),
])  # fmt: skip
def test_bad_sizes_are_refused_naming_the_fix(value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(apply_overrides(Recipe().to_dict(), [f"attention.train_window_sizes={value}"]))
    with pytest.raises(ConfigError, match="the window 'none' has no softmax keys"):
        Recipe.from_dict(apply_overrides(Recipe().to_dict(), ["attention.window=none",
                                                              "attention.train_window_sizes=[32,64]"]))
    good = Recipe.from_dict(apply_overrides(Recipe().to_dict(), ["attention.train_window_sizes=[32,64]"]))
    assert good.attention.train_window_sizes == [32, 64]


def test_every_layer_runs_the_drawn_size_and_gets_its_own_window_back() -> None:
    model = converted_model(sinks=2, gate=False, size=8, seed=5)
    layers = [m for _, m in linearized_layers(model)]
    before = [m.window for m in layers]
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = model(ids, use_cache=False).logits
        torch.manual_seed(0)
        with random_window(layers, [3, 20]) as size:
            assert size in (3, 20)
            assert {m.window.params.size for m in layers} == {size}
            assert {m.window.sinks for m in layers} == {2}  # only the size changes
            drawn = model(ids, use_cache=False).logits
        same_size = converted_model(sinks=2, gate=False, size=size, seed=5)(ids, use_cache=False).logits
        after = model(ids, use_cache=False).logits
    torch.testing.assert_close(drawn, same_size)  # the computation is that of a model built with the size
    assert not torch.allclose(drawn, own, atol=1e-4)
    assert [m.window for m in layers] == before and before[0].params.size == 8  # restored, never mutated
    torch.testing.assert_close(after, own)


def test_the_draw_follows_the_seed_and_covers_the_list() -> None:
    layers = [m for _, m in linearized_layers(converted_model(sinks=0, gate=False))]

    def draws(seed: int) -> list[int]:
        torch.manual_seed(seed)
        out = []
        for _ in range(30):
            with random_window(layers, [4, 8, 16]) as size:
                out.append(size)
        return out

    assert draws(1) == draws(1)  # a resumed run (the trainer reseeds per step) draws the same sizes
    assert set(draws(1)) == {4, 8, 16}
    with random_window(layers, None) as size:
        assert size is None and {m.window.params.size for m in layers} == {8}


def test_transfer_trains_on_drawn_sizes_and_evaluates_on_its_own() -> None:
    model = converted_model(sinks=0, gate=False, size=8)
    set_mode(model, "transfer")
    seen: list[int] = []
    layer = linearized_layers(model)[0][1]
    layer.register_forward_hook(lambda m, *_: seen.append(m.window.params.size))
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    objective = TransferObjective(model, ids, torch.device("cpu"), 1.0, window_sizes=[4, 16])
    torch.manual_seed(3)
    for _ in range(12):
        objective.loss(ids)
    assert set(seen) == {4, 16}
    seen.clear()
    objective.evaluate()
    assert seen == [8]


def test_both_stages_train_with_sizes_and_record_them(tiny_model_dir, tmp_path) -> None:
    run = tmp_path / "transfer"
    run_transfer(tiny_recipe(tiny_model_dir, "transfer.max_steps=2", "attention.train_window_sizes=[4,8]"), run,
                 device="cpu")
    assert load_recipe(run / "recipe.resolved.yaml").attention.train_window_sizes == [4, 8]
    tuned = tmp_path / "finetune"
    run_finetune(run, tuned, ["finetune.max_steps=2", "finetune.eval_every=2",
                                            "attention.train_window_sizes=[4,32]"], device="cpu")
    assert load_recipe(tuned / "recipe.resolved.yaml").attention.train_window_sizes == [4, 32]
