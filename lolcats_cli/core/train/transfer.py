"""Stage 1, attention transfer (docs/method.md section 3): the entry point.

Every converted layer runs in ``transfer`` mode: the teacher's softmax output goes on into the residual
stream while the student's hybrid output is scored against it (MSE before o_proj), so layers train
independently. Only the feature maps and the window factors train. :func:`run_transfer` checks the recipe,
prepares the run directory, joins the torchrun process group when there is one, and hands the run to its
mode (``joint`` or ``blockwise``, :mod:`.transfer_modes`). The run directory receives the resolved recipe,
versions.json, checkpoints, ``attention.safetensors`` (the best trainables) and ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ConfigError
from ..data.data import check_data_budget
from ..progress import Reporter
from ..recipe.recipe import Recipe, load_recipe
from ..runs.rundir import RESOLVED_RECIPE
from ..runs.workspace import check_plugins, check_window_fits, new_run_dir
from .transfer_modes import MODES, mode_of
from .transfer_modes.common import TransferJob, TransferObjective, TransferResult
from .transfer_modes.distributed import session


def run_transfer(
    recipe: Recipe | None,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    device: str | torch.device | None = None,
) -> TransferResult:
    """Train the linear attentions of ``recipe.model`` to mimic its softmax attentions.

    With ``resume``, the recipe saved in ``run_dir`` is used (``recipe`` may be None) and the run continues
    from its last checkpoint to exactly where an uninterrupted run would have ended. A run that fails before
    its first checkpoint removes what it wrote (see :func:`~lolcats_cli.core.runs.workspace.new_run_dir`); Ctrl-C
    raises :class:`~lolcats_cli.core.train.trainer.TrainingInterrupted`. Under torchrun (WORLD_SIZE > 1) every rank
    calls this; rank 0 prepares the run directory and the others wait for it.
    """
    if not resume:
        if recipe is None:
            raise ConfigError("no recipe given", "pass --recipe or --model")
        check_plugins(recipe)  # before anything is written
        check_window_fits(recipe)
    with session(device) as dist:
        if not dist.is_main:
            dist.barrier()  # rank 0 has prepared the folder
            return _transfer(recipe, Path(run_dir), resume, reporter, dist.device(device), dist)
        with new_run_dir(run_dir, resume=resume, overwrite=overwrite) as run_dir:
            if not resume:
                check_data_budget(recipe)  # the tokenizer only: a dataset too small fails before any weights load
            dist.barrier()
            return _transfer(recipe, run_dir, resume, reporter, dist.device(device), dist)


def _transfer(recipe: Recipe | None, run_dir: Path, resume: bool, reporter: Reporter | None,
              device: torch.device, dist) -> TransferResult:
    if resume:
        recipe = load_recipe(run_dir / RESOLVED_RECIPE)
    job = TransferJob(recipe, run_dir, resume, reporter, device, dist)
    return MODES[mode_of(recipe, dist.world)](job)


__all__ = ["run_transfer", "TransferObjective", "TransferResult"]
