"""Distributed training applied from outside the model (torchtitan style).

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup()`` reads them, picks NCCL on GPUs
and gloo on CPUs, and returns who we are. A plain ``python train/stage1.py`` is a world of
one with no process group. Every rendezvous and collective waits at most ``timeout_s``
(``--dist-timeout``); under torchrun each attempt of a job (the first start and every
``--max-restarts`` restart) builds its process group on a store of its own
(:func:`attempt_store`), so that a restart never meets the dead attempt's keys. ``wrap_model`` applies DDP or FSDP2; ``sync_gradients`` skips the
all-reduce on all but the last micro-batch of a step. ``rank_world`` and ``strided_shard``
split an evaluation's items over the ranks (evaluate, latent statistics).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import os
import socket
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from vitok_fast.defaults import DEFAULT_DIST_TIMEOUT_S


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


DEFAULT_TIMEOUT_S = DEFAULT_DIST_TIMEOUT_S  # --dist-timeout (vitok_fast/defaults.py)


def setup(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the process group if launched by torchrun (or with RANK, WORLD_SIZE, MASTER_ADDR
    and MASTER_PORT set by hand); choose the device for this rank. The rendezvous and every
    collective give up after ``timeout_s`` seconds."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun
            dist.init_process_group(backend, store=attempt_store(rank, world, timeout),
                                    rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return Dist(rank, local_rank, world, dev)


_ATTEMPT_KEY = "vitok_fast/attempt_store"


def attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """A TCPStore that only this attempt's workers know: rank 0 hosts it on a free port and
    announces ``host:port:token`` under one key of torchrun's store; the others wait for an
    announcement whose server answers with the same token.

    Why: torchrun keeps one store for the whole job and hands it to every attempt, and since
    torch 2.4 the workers' keys are no longer prefixed by attempt (``TORCHELASTIC_USE_AGENT_STORE``:
    "we create a new TCPStore for every retry", which the static rendezvous of ``torchrun
    --master_port`` and the shared store of ``--rdzv-backend c10d`` do not). Restarted gloo ranks
    then read the dead attempt's peer addresses ("Gloo connectFullMesh failed ... Connection
    refused"), or wait forever on keys the dead attempt had already consumed. Seen and tested
    with torch 2.14.1; the workaround uses only ``TCPStore`` and
    ``init_process_group(store=...)``, public in every torch this package supports (>= 2.4). Prefixing the keys by ``TORCHELASTIC_RESTART_COUNT``
    would not do: on several nodes the agents count restarts each for itself.

    A stale announcement names the dead attempt's rank 0, whose server is gone (torchrun stops
    every worker of an attempt before it starts the next), so it is simply read again."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    shared, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        with socket.create_connection((host, port), timeout=timeout.total_seconds()) as s:
            me = s.getsockname()[0]  # the address the other nodes reach this one by
        token = uuid.uuid4().hex
        store = _master_store(me, world, timeout)
        store.set("token", token)
        shared.set(_ATTEMPT_KEY, f"{me}:{store.port}:{token}")
        return _keep(store)
    while True:
        host0, port0, token = shared.get(_ATTEMPT_KEY).decode().rsplit(":", 2)
        store = _connect(host0, int(port0), world, timeout)
        # check() does not wait: a stranger's store that took over a dead port says no
        if store is not None and store.check(["token"]) and store.get("token").decode() == token:
            return _keep(store)
        if time.monotonic() > deadline:
            raise dist.DistStoreError(
                f"rank {rank}: no rank 0 of this attempt announced its store on "
                f"{host}:{port} within {timeout.total_seconds():.0f} s (--dist-timeout)")
        time.sleep(0.1)


_STORE: list = []  # this attempt's store, released by cleanup() at a known point


def _keep(store: dist.TCPStore) -> dist.TCPStore:
    _STORE[:] = [store]
    return store


def _master_store(host: str, world: int, timeout) -> dist.TCPStore:
    """The attempt's store server on a free port. Not the libuv server (torch's default since
    2.4): its destructor skips joining its thread when it finds the loop stopped, and a
    joinable ``std::thread`` destroyed at interpreter exit aborts the process ("terminate
    called without an active exception", SIGABRT after a finished run: seen in CI on rank 0,
    the server's host, with torch 2.14.1 under load). The classic server always joins."""
    try:
        return dist.TCPStore(host, 0, world, is_master=True, timeout=timeout,
                             wait_for_workers=False, use_libuv=False)
    except TypeError:  # a torch without the use_libuv argument has only the classic server
        return dist.TCPStore(host, 0, world, is_master=True, timeout=timeout,
                             wait_for_workers=False)


def _connect(host: str, port: int, world: int, timeout):
    """A client of the store at ``host:port``, or None if nothing listens there (a dead
    attempt's rank 0; a node that is gone does not answer within a few seconds)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return None
    return dist.TCPStore(host, port, world, is_master=False, timeout=timeout)


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says another rank is gone or silent (a collective or the store timed
    out, a connection closed), as opposed to a bug or a bad input on this rank."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return False
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        key in text for key in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed",
                                "Timed out", "TCPStore"))


def cleanup() -> None:
    """Destroy the process group, then release this attempt's store (:func:`attempt_store`)
    and collect the garbage that still holds distributed objects, while the interpreter is
    whole: a store server or a gloo context destroyed during interpreter shutdown can abort
    a finished run."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if _STORE:
        _STORE.clear()
        gc.collect()


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
