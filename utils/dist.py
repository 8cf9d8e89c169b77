"""Distributed helpers (the only place that touches torch.distributed): torchrun env, rank info, gathers."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands; kept apart from the (immutable) run config."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str, port: int | None = None) -> DistInfo:
    """Join the process group described by torchrun's (or our spawner's) RANK/WORLD_SIZE/LOCAL_RANK variables.

    NCCL on GPUs, gloo on the CPU. Without those variables this is a single process and nothing is initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if port is not None:
            os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return DistInfo(rank, world, local_rank, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device_type: str, port: int | None = None) -> Iterator[tuple[DistInfo, Any]]:
    """init_distributed for the length of a with block; yields (DistInfo, coordination_group()).

    A block that ends normally waits for every process (a barrier on the coordination group, which waits as long as
    the main process takes to write its files and metrics) before the groups are destroyed: a process that tears its
    connections down while a peer's last messages are still in flight can abort (a gloo rank of a two-process
    evaluation did, with SIGABRT). A block that raises leaves at once: a peer it would wait for may never come.
    """
    info = init_distributed(device_type, port)
    group = coordination_group()
    try:
        yield info, group
        if group is not None:
            dist.barrier(group=group)
    finally:
        cleanup()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place, returned for chaining); identity in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every process's object, in rank order (a list of one in a single process); group: the default one or one of
    coordination_group()."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def coordination_group(timeout_s: float = 7 * 24 * 3600.0) -> Any:
    """A gloo group of every process, for small CPU-side messages that may wait long (a process done with its share
    waiting for the slowest one, or for a file the main process is writing) where the default group would time out
    (NCCL's watchdog after 10 minutes). None in a single process; every process must call it, in the same order."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def launch(worker: Callable[[Any], Any], cfg: Any, num_procs: int, port: int) -> Any:
    """Run worker(cfg) in this process, or in num_procs spawned ones (the seed's --num_gpus) unless torchrun already
    set WORLD_SIZE; returns the worker's result in the single-process case."""
    if num_procs > 1 and "WORLD_SIZE" not in os.environ:
        mp.spawn(_spawned, args=(worker, cfg, num_procs, port), nprocs=num_procs, join=True)
        return None
    return worker(cfg)


def _spawned(rank: int, worker: Callable[[Any], Any], cfg: Any, num_procs: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(num_procs),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    worker(cfg)
