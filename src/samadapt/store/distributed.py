"""torch.distributed helpers for sharded embedding: no-ops in a single process."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Ranks wait in a collective while the slowest rank finishes its share of the encoder work;
# on a big dataset that can exceed torch's 30-minute default.
COLLECTIVE_TIMEOUT = timedelta(hours=float(os.environ.get("SAMADAPT_DIST_TIMEOUT_HOURS", "24")))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...); return the device to use.

    gloo on CPU, nccl on CUDA with one GPU per process (LOCAL_RANK). A plain process returns `device` unchanged.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device.startswith("cuda") and world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from `src` to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
