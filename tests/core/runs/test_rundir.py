"""The run-directory layout: one finished-run check, asked alike by every command that reads a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lolcats_cli.core.runs import rundir
from lolcats_cli.errors import LolcatsError


def make_run(folder: Path, *names: str) -> Path:
    """A run directory holding empty files ``names`` (``adapter/adapter_config.json`` makes the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    return folder


TRANSFER = (rundir.RESOLVED_RECIPE, rundir.VERSIONS, rundir.ATTENTION_WEIGHTS, rundir.METRICS)
FINETUNE = (*TRANSFER, rundir.SOURCE, rundir.PEFT_CONFIG)


def test_a_finished_run_and_its_kind(tmp_path: Path) -> None:
    assert rundir.finished_run(make_run(tmp_path / "t", *TRANSFER)) == "transfer"
    assert rundir.finished_run(make_run(tmp_path / "f", *FINETUNE)) == "finetune"
    assert rundir.require_finished_run(tmp_path / "f") == "finetune"


@pytest.mark.parametrize(("names", "missing"), [
    ((), "recipe.resolved.yaml, attention.safetensors, metrics.json"),
    ((rundir.RESOLVED_RECIPE, rundir.ATTENTION_WEIGHTS), "metrics.json"),  # a transfer killed before the end
    # a finetune killed before the end: its recipe and its copy of the attention weights are written first
    ((rundir.RESOLVED_RECIPE, rundir.SOURCE, rundir.ATTENTION_WEIGHTS), "metrics.json, adapter/adapter_config.json"),
    ((*TRANSFER, rundir.SOURCE), "adapter/adapter_config.json"),
])
def test_an_unfinished_run_names_what_it_misses(tmp_path: Path, names: tuple[str, ...], missing: str) -> None:
    run = make_run(tmp_path / "run", *names)
    assert rundir.finished_run(run) is None
    with pytest.raises(LolcatsError) as err:
        rundir.require_finished_run(run)
    assert str(err.value).splitlines()[0] == f"{run} is not a finished lolcats run (missing: {missing})"
    assert "--resume" in (err.value.hint or "")


def test_no_folder_is_no_run(tmp_path: Path) -> None:
    assert rundir.finished_run(tmp_path / "nope") is None
    assert rundir.missing(tmp_path / "nope") == ["the folder itself"]
    (tmp_path / "a-file").write_text("")
    assert rundir.missing(tmp_path / "a-file") == ["the folder itself"]


def test_checkpoints_of_every_mode_are_seen(tmp_path: Path) -> None:
    assert not rundir.has_checkpoint(make_run(tmp_path / "a", rundir.RESOLVED_RECIPE))
    assert rundir.has_checkpoint(make_run(tmp_path / "b", "checkpoints/step-00000002/state.json"))
    assert rundir.has_checkpoint(make_run(tmp_path / "c", "checkpoints/block-001/step-00000002/state.json"))
    assert rundir.has_checkpoint(make_run(tmp_path / "d", "blocks/shard-0/x.safetensors"))


def _open(run: Path, tmp_path: Path) -> None:
    from lolcats_cli.core.runs.workspace import open_run

    open_run(run, "cpu")


def _export(run: Path, tmp_path: Path) -> None:
    from lolcats_cli.core.export.export import export_run

    export_run(run, tmp_path / "out", "adapter")


def _evaluate(run: Path, tmp_path: Path) -> None:
    from lolcats_cli.core.eval.evaluate import evaluate_run

    evaluate_run(run, device="cpu")


def _finetune(run: Path, tmp_path: Path) -> None:
    from lolcats_cli.core.train.finetune import run_finetune

    run_finetune(run, tmp_path / "ft", device="cpu")


@pytest.mark.parametrize("command", [_open, _export, _evaluate, _finetune], ids=lambda f: f.__name__[1:])
def test_every_command_refuses_an_unfinished_finetune_run_alike(command, tmp_path: Path) -> None:
    run = make_run(tmp_path / "killed", rundir.RESOLVED_RECIPE, rundir.SOURCE, rundir.ATTENTION_WEIGHTS)
    with pytest.raises(LolcatsError) as err:
        command(run, tmp_path)
    assert str(err.value).splitlines()[0] == (f"{run} is not a finished lolcats run "
                                              "(missing: metrics.json, adapter/adapter_config.json)")
