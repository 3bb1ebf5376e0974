"""torch.distributed for stage 1: the ranks of a run launched by ``torchrun`` (one rank otherwise).

``torchrun --nproc-per-node N -m lolcats_cli transfer ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*;
:func:`session` joins that process group (gloo on CPU, nccl on CUDA) and leaves it afterwards. Without those
variables it is one rank and nothing is initialised, so single-process runs never touch torch.distributed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist

from ....errors import ConfigError

# Ranks wait for each other at the end of the teacher pass and before stitching, while the slowest rank
# trains its blocks: hours, not the default 30 minutes.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its host."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def device(self, requested: str | torch.device | None) -> torch.device:
        """This rank's device: ``requested`` ("cuda" becomes ``cuda:LOCAL_RANK`` under torchrun), else its
        GPU when there is one, else the CPU."""
        if requested is None:
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None and self.world > 1:
            device = torch.device("cuda", self.local_rank)
        return device


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer", "launch with torchrun, which sets it") from None


@contextlib.contextmanager
def session(device: str | torch.device | None = None) -> Iterator[Dist]:
    """The ranks of this run; joins (and afterwards leaves) the torchrun process group when WORLD_SIZE > 1."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield Dist()
        return
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = (torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    backend = "nccl" if cuda else "gloo"
    created = not torch_dist.is_initialized()
    if created:
        if cuda:
            torch.cuda.set_device(local)
        torch_dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    try:
        yield Dist(rank, world, local, torch_dist.get_backend())
    finally:
        if created and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


__all__ = ["Dist", "session", "BARRIER_TIMEOUT"]
