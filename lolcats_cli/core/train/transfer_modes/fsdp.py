"""Joint attention transfer over several processes with FSDP2 (``torch.distributed.fsdp.fully_shard``): for
a model whose weights do not fit one device, trained jointly (``transfer.block_size`` unset) under torchrun.

The frozen weights are sharded over the ranks, one FSDP group per decoder layer plus the decoder itself; the
trainables (feature maps, window factors, gates: a few MB) are left out of the sharding (``ignored_params``),
so every rank holds them whole, the trainer sums their gradients over the ranks, and checkpoints and
``attention.safetensors`` are exactly those of one-process joint transfer. Each update's micro-batches are
split over the ranks (data parallel), so with ``grad_accum`` a multiple of the ranks the run matches the
one-process run up to float reassociation. Every rank reads the weights into CPU memory before sharding.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ...model.architectures import arch_spec
from ...model.convert import attention_parameters
from ...runs.rundir import ATTENTION_WEIGHTS, CHECKPOINTS, METRICS
from ..checkpoint import load_json
from .common import TransferJob, TransferResult, fit_layers, save_attention, write_metrics
from .joint import joint_metrics, setup_joint


def shard_model(model: torch.nn.Module, device: torch.device, world: int, *,
                keep: Iterable[torch.nn.Parameter] = (), whole: bool = False) -> None:
    """FSDP2 over ``world`` ranks: every decoder layer, then the decoder (``whole``: the whole model instead,
    its LM head and tied embeddings included, for stage 2 that uses them); the attention parameters, ``keep``
    (stage 2's LoRA weights) and the buffers stay whole on every rank (moved to ``device``)."""
    mesh = init_device_mesh(device.type, (world,))
    keep = set(attention_parameters(model).values()) | set(keep)
    for layer in arch_spec(model.config).decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=keep)
    fully_shard(model if whole else getattr(model, model.base_model_prefix), mesh=mesh, ignored_params=keep)
    model.to(device)  # the local shards, the trainables, the buffers (and, unless whole, the unused LM head)


def run_fsdp(job: TransferJob) -> TransferResult:
    dist = job.dist
    model, train_ids, objective = setup_joint(job, torch.device("cpu"))  # sharded from the CPU copy
    shard_model(model, job.device, dist.world)
    title = f"attention transfer (FSDP over {dist.world} processes)"
    done = fit_layers(job, objective, attention_parameters(model), train_ids, job.run_dir / CHECKPOINTS, title,
                      resume=job.resume, ranks=(dist.rank, dist.world), per_layer_backward=False)
    if dist.is_main:
        save_attention(model, job.run_dir / ATTENTION_WEIGHTS)
        write_metrics(job.run_dir, joint_metrics("fsdp", done, train_ids, job.device, world_size=dist.world))
    dist.barrier()
    metrics, fit = load_json(job.run_dir / METRICS), done.fit
    return TransferResult(job.run_dir, metrics["layers"], fit.steps, fit.tokens, fit.wall_time_s, fit.best_step, "fsdp")


__all__ = ["run_fsdp", "shard_model"]
