"""Stage-1 training modes, each a unit beside the others (``run(job) -> TransferResult``):

* ``joint`` (:mod:`.joint`): every converted layer at once, in one process;
* ``blockwise`` (:mod:`.blockwise`): blocks of ``transfer.block_size`` layers trained independently from
  stored teacher inputs (:mod:`.block_cache`), spread over torchrun ranks (:mod:`.distributed`).

They share the objective, the trainer and the output files (:mod:`.common`). Adding a mode is one module and
one line in :data:`MODES`.
"""

from __future__ import annotations

from collections.abc import Callable

from ...errors import ConfigError
from ..recipe import Recipe
from .common import TransferJob, TransferResult
from .joint import run_joint


def run_blockwise(job: TransferJob) -> TransferResult:
    size = job.recipe.transfer.block_size
    raise ConfigError(
        f"transfer.block_size: block-wise transfer (block_size={size}) is not implemented yet",
        "set transfer.block_size=null to train all layers jointly",
    )


MODES: dict[str, Callable[[TransferJob], TransferResult]] = {"joint": run_joint, "blockwise": run_blockwise}


def mode_of(recipe: Recipe) -> str:
    """The mode a recipe asks for: block-wise when ``transfer.block_size`` is set, else joint."""
    return "blockwise" if recipe.transfer.block_size is not None else "joint"


__all__ = ["MODES", "mode_of"]
