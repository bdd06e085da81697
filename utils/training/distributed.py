"""Data-parallel training without wrapping the model: fit() joins the process group torchrun
describes, starts every rank from rank 0's weights and averages gradients itself (one flat
all-reduce per step, as DistributedDataParallel's buckets do)."""

from __future__ import annotations

import itertools
import math
import os

import torch
import torch.distributed as dist

from utils.training.config import TrainConfig


def agree(flags: tuple[bool, bool], world: int) -> tuple[bool, bool]:
    """Rank 0's (improved, stop) decision, on every rank: only rank 0 validates."""
    if world == 1:
        return flags
    shared = [flags]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes if nobody has yet."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_from_rank0(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's weights, as DistributedDataParallel does at construction:
    whatever the caller drew per process (peft's LoRA init, an init from torch's global
    generator) would otherwise differ between ranks, and averaged gradients never fix that."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.data, src=0)


def all_reduce_mean(
    trainable: list[torch.nn.Parameter], sums: dict[str, float], world: int
) -> dict[str, float]:
    """Average the trainable gradients (one flat all-reduce, like DDP's buckets) and the
    logged losses over all processes; every rank then takes the same optimiser step."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for parameter, chunk in zip(trainable, flat.split([g.numel() for g in grads]), strict=True):
        parameter.grad = chunk.view_as(parameter)
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, (values / world).tolist(), strict=True))


def objects_for(
    micro_batch: int, n_objects: int, config: TrainConfig, rank: int, world: int
) -> tuple[int, list[int]]:
    """(epoch, dataset indices) of one micro-batch: a seeded permutation per epoch, sharded by
    rank. A pure function of the micro-batch counter, so resuming needs no loader state."""
    per_micro_batch = config.batch_size * world
    micro_batches_per_epoch = math.ceil(n_objects / per_micro_batch)
    epoch, position = divmod(micro_batch, micro_batches_per_epoch)
    seed = config.seed * 100_003 + epoch  # no overlap between (seed, epoch) pairs
    order = torch.randperm(n_objects, generator=torch.Generator().manual_seed(seed))
    start = position * per_micro_batch + rank * config.batch_size
    return epoch, [int(order[(start + j) % n_objects]) for j in range(config.batch_size)]
