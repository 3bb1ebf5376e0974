"""A run directory's layout: the names of what a run writes, and the one check that a run finished.

What ``lolcats transfer --output DIR`` and ``lolcats finetune --output DIR`` write at the top of ``DIR``::

    recipe.resolved.yaml   every setting; written first, it marks a lolcats run directory (--resume needs it)
    versions.json          lolcats, torch, transformers and the plugins that made the run
    source.json            a finetune run only (it marks one): the transfer run it started from
    attention.safetensors  the trained feature maps, window factors, gates and decays
    adapter/               a finetune run only: the peft LoRA adapter (adapter_config.json, adapter_model.safetensors)
    metrics.json           written last: the run finished
    checkpoints/           step-N/ and latest.json (block-K/step-N/ for block-wise transfer)
    blocks/                block-wise transfer only: the block inputs its teacher pass stored

A finished run is what :func:`finished_run` says: the recipe, the attention weights and the metrics, and for
a finetune run its adapter too. Every command that reads a run asks it (through
:func:`require_finished_run`), so they all agree. An adapter export (``core/export/export.py``) reuses two names:
``attention.safetensors`` and ``adapter/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ...errors import LolcatsError

RESOLVED_RECIPE = "recipe.resolved.yaml"
VERSIONS = "versions.json"
SOURCE = "source.json"
ATTENTION_WEIGHTS = "attention.safetensors"
ADAPTER_DIR = "adapter"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # in adapter/; only safetensors adapters
PEFT_CONFIG = f"{ADAPTER_DIR}/{PEFT_FILES[0]}"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
BLOCKS = "blocks"
WRITE_TEST = ".write-test"  # a run checks that it can write its folder with this file
# Everything a run writes at the top of its directory; only these are ever removed from a folder.
RUN_ENTRIES = (RESOLVED_RECIPE, VERSIONS, SOURCE, ATTENTION_WEIGHTS, METRICS, CHECKPOINTS, ADAPTER_DIR, BLOCKS,
               WRITE_TEST)

RunKind = Literal["transfer", "finetune"]
FINISHED_HINT = ("pass the --output folder of a completed `lolcats transfer` or `lolcats finetune` (resume it with "
                 "--resume if it was interrupted)")


def is_run_dir(path: Path | str) -> bool:
    """Whether ``path`` is a lolcats run directory, finished or not (it holds ``recipe.resolved.yaml``)."""
    return (Path(path) / RESOLVED_RECIPE).is_file()


def run_kind(path: Path | str) -> RunKind:
    """``"finetune"`` for a run that holds ``source.json``, else ``"transfer"`` (finished or not)."""
    return "finetune" if (Path(path) / SOURCE).is_file() else "transfer"


def has_lora(path: Path | str) -> bool:
    """Whether the run (or adapter export) ``path`` holds a peft adapter."""
    return (Path(path) / PEFT_CONFIG).is_file()


def missing(path: Path | str) -> list[str]:
    """What ``path`` lacks to be a finished run, by name (``["the folder itself"]`` when it is no folder)."""
    path = Path(path)
    if not path.is_dir():
        return ["the folder itself"]
    needed = [RESOLVED_RECIPE, ATTENTION_WEIGHTS, METRICS] + ([PEFT_CONFIG] if run_kind(path) == "finetune" else [])
    return [name for name in needed if not (path / name).is_file()]


def finished_run(path: Path | str) -> RunKind | None:
    """``"transfer"`` or ``"finetune"`` when ``path`` is a finished run of that stage, else None."""
    return None if missing(path) else run_kind(path)


def require_finished_run(path: Path | str, hint: str = FINISHED_HINT) -> RunKind:
    """:func:`finished_run`, or a LolcatsError naming the folder, what it misses and ``hint``."""
    gaps = missing(path)
    if gaps:
        raise LolcatsError(f"{path} is not a finished lolcats run (missing: {', '.join(gaps)})", hint)
    return run_kind(path)


def has_checkpoint(run_dir: Path | str) -> bool:
    """Whether ``run_dir`` holds a checkpoint (complete or damaged) that ``--resume`` would use: a step folder,
    one of a block-wise run's blocks (``checkpoints/block-*/``), or block inputs its teacher pass stored."""
    ckpt = Path(run_dir) / CHECKPOINTS
    return ((ckpt / "latest.json").exists() or any(ckpt.glob("step-*/state.json"))
            or any(ckpt.glob("block-*/step-*/state.json")) or any((Path(run_dir) / BLOCKS).glob("**/*.safetensors")))


__all__ = ["RESOLVED_RECIPE", "VERSIONS", "SOURCE", "ATTENTION_WEIGHTS", "ADAPTER_DIR", "PEFT_FILES", "PEFT_CONFIG",
           "METRICS", "CHECKPOINTS", "BLOCKS", "WRITE_TEST", "RUN_ENTRIES", "RunKind", "FINISHED_HINT", "is_run_dir",
           "run_kind", "has_lora", "missing", "finished_run", "require_finished_run", "has_checkpoint"]
