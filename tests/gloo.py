"""Real multi-process tests on the CPU: a free port, and one rank of a gloo process group."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank: int, port: int, world_size: int) -> Iterator:
    """Join a gloo group as ``rank`` (one intra-op thread) and yield its DistributedRuntime; leave it afterwards."""
    from egp_export.distributed import DistributedRuntime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield DistributedRuntime()
    finally:
        dist.destroy_process_group()
