"""Stage-1 training modes, each a unit beside the others (``run(job) -> TransferResult``):

* ``joint`` (:mod:`.joint`): every converted layer at once, in one process;
* ``blockwise`` (:mod:`.blockwise`): blocks of ``transfer.block_size`` layers trained independently from
  stored teacher inputs (:mod:`.block_cache`), spread over torchrun ranks (:mod:`.distributed`).

They share the objective, the trainer and the output files (:mod:`.common`). Adding a mode is one module and
one line in :data:`MODES`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..recipe import Recipe
from .blockwise import run_blockwise
from .common import TransferJob, TransferResult
from .joint import run_joint

MODES: dict[str, Callable[[TransferJob], TransferResult]] = {"joint": run_joint, "blockwise": run_blockwise}


def mode_of(recipe: Recipe) -> str:
    """The mode a recipe asks for: block-wise when ``transfer.block_size`` is set, else joint."""
    return "blockwise" if recipe.transfer.block_size is not None else "joint"


__all__ = ["MODES", "mode_of"]
