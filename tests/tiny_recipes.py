"""The recipe of a short stage-1 run on a tiny model (a few real steps in seconds on a CPU), shared by the tests
of every stage that needs a trained run."""

from __future__ import annotations

from pathlib import Path

from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides


def tiny_recipe(model_dir: Path, *extra: str) -> Recipe:
    overrides = [
        f"model.name={model_dir}",
        "data.dataset=pydoc",
        "data.seq_len=96",
        "attention.window_params.size=16",
        "data.holdout=4",
        "data.num_eval_sequences=2",
        "data.max_samples=40",
        "transfer.batch_size=1",
        "transfer.grad_accum=2",
        "transfer.max_steps=6",
        "transfer.eval_every=3",
        "transfer.lr=0.01",
        *extra,
    ]
    return Recipe.from_dict(apply_overrides(Recipe().to_dict(), overrides))
