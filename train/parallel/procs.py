"""Start N local CPU processes joined in one gloo process group: what the pipeline tests and
`python -m train.parallel.bench_pp` run on, without a launcher."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nothing listens on now, for the group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, nprocs: int, port: int, threads: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=nprocs)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, nprocs: int, *args, threads: int = 1) -> None:
    """Run fn(rank, *args) in `nprocs` fresh processes (the spawn start method: fn must be a
    module-level function) in one gloo group, each with `threads` torch threads; raises if a
    process fails."""
    mp.spawn(_entry, args=(nprocs, free_port(), threads, fn, args), nprocs=nprocs, join=True)
