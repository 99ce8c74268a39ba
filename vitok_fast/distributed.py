"""Distributed training applied from outside the model (torchtitan style).

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup()`` reads them, picks NCCL on GPUs
and gloo on CPUs, and returns who we are. A plain ``python train/stage1.py`` is a world of
one with no process group. ``wrap_model`` applies DDP or FSDP2; ``sync_gradients`` skips the
all-reduce on all but the last micro-batch of a step. ``rank_world`` and ``strided_shard``
split an evaluation's items over the ranks (evaluate, latent statistics).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> Dist:
    """Join the process group if launched by torchrun; choose the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return Dist(rank, local_rank, world, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, d: Dist, mode: str = "ddp") -> nn.Module:
    """``mode`` ddp: DistributedDataParallel; fsdp: FSDP2 ``fully_shard`` per transformer block
    and at the root (parameters, gradients and optimizer state sharded: for the large
    decoders). A world of one is returned unwrapped."""
    if not d.enabled:
        return model
    if mode == "ddp":
        ids = [d.device.index] if d.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for transformer in (model.encoder.transformer, model.decoder.transformer):
            for block in transformer.blocks:
                fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}: expected 'ddp' or 'fsdp'")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def sync_gradients(model: nn.Module, enabled: bool):
    """A context in which backward all-reduces gradients only if ``enabled`` (the last
    micro-batch of a step): gradient accumulation without redundant communication."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def all_max(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# -- full (unsharded) states for checkpoints: every rank calls these, rank 0 writes ---------


def full_model(model: nn.Module, plain_factory) -> nn.Module | None:
    """A plain module holding the full weights: the unwrapped module for DDP or a world of
    one; for FSDP2 the shards are gathered to CPU (a collective) into ``plain_factory()``
    on rank 0 (None elsewhere)."""
    if not is_fsdp(model):
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = plain_factory()
    plain.load_state_dict(state)
    return plain


def optimizer_state(model: nn.Module, optimizer) -> dict:
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, or ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def strided_shard(dataset, rank: int, world: int, max_samples: int | None):
    """Items rank, rank + world, ... of the first max_samples (every rank sees distinct items)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if hasattr(dataset, "world"):  # tar shards split by rank themselves: one split only,
            dataset.rank, dataset.world = 0, 1  # the one below, so no item is lost or doubled
        class _Strided(torch.utils.data.IterableDataset):
            def __iter__(self):
                items = itertools.islice(dataset, max_samples)
                return itertools.islice(items, rank, None, world)
        return _Strided()
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    return torch.utils.data.Subset(dataset, range(rank, n, world))
