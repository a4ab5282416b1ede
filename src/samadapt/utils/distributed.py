"""Joining the process group torchrun describes: one place for the device and backend rules.

gloo on CPU, nccl on CUDA with one GPU per process (LOCAL_RANK). A plain process (no WORLD_SIZE > 1) joins nothing.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# Ranks wait in collectives while the slowest rank finishes its share (a long encoder pass, an epoch);
# torch's 30-minute default is too short for big datasets.
COLLECTIVE_TIMEOUT = timedelta(hours=float(os.environ.get("SAMADAPT_DIST_TIMEOUT_HOURS", "24")))


def join_process_group(device: str | None = None) -> torch.device:
    """Initialise torch.distributed when launched by torchrun; return this process's device.

    ``device=None`` picks CUDA when available, else the CPU; ``"cuda"`` under torchrun becomes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if torch_device.index is None:
            torch_device = torch.device("cuda", local_rank if world_size > 1 else 0)
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return torch_device
