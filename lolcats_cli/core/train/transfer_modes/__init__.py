"""Stage-1 training modes, each a unit beside the others (``run(job) -> TransferResult``):

* ``joint`` (:mod:`.joint`): every converted layer at once, in one process;
* ``blockwise`` (:mod:`.blockwise`): blocks of ``transfer.block_size`` layers trained independently from
  stored teacher inputs (:mod:`.block_cache`), spread over torchrun ranks (:mod:`.distributed`);
* ``fsdp`` (:mod:`.fsdp`): joint transfer under torchrun, the frozen weights sharded over the ranks (FSDP2).

They share the objective, the trainer and the output files (:mod:`.common`). Adding a mode is one module and
one line in :data:`MODES`.
"""

from __future__ import annotations

from collections.abc import Callable

from ...recipe.recipe import Recipe
from .blockwise import run_blockwise
from .common import TransferJob, TransferResult
from .fsdp import run_fsdp
from .joint import run_joint

MODES: dict[str, Callable[[TransferJob], TransferResult]] = {
    "joint": run_joint, "blockwise": run_blockwise, "fsdp": run_fsdp,
}


def mode_of(recipe: Recipe, world: int = 1) -> str:
    """The mode a recipe runs in over ``world`` processes: block-wise when ``transfer.block_size`` is set,
    else joint (FSDP-sharded when there are several processes)."""
    if recipe.transfer.block_size is not None:
        return "blockwise"
    return "fsdp" if world > 1 else "joint"


__all__ = ["MODES", "mode_of"]
