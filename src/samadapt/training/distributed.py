"""torch.distributed helpers: one code path for a single process and for torchrun (gloo on CPU, nccl on GPU).

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) `init_distributed()` joins the process group;
otherwise it returns a single-process context and nothing else changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from samadapt.utils.distributed import join_process_group


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, device: str | None = None) -> DistContext:
    """Join the torchrun process group when launched by torchrun; choose the device (cuda:LOCAL_RANK or cpu)."""
    torch_device = join_process_group(device)
    if not dist.is_initialized() or dist.get_world_size() <= 1:
        return DistContext(device=torch_device)
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        device=torch_device,
    )


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel when running under torchrun, the model itself otherwise."""
    model = model.to(ctx.device)
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mean_across_ranks(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    # NCCL reduces only tensors on this rank's GPU; gloo takes CPU tensors.
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / ctx.world_size


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's value on every rank (keeps decisions such as early stopping identical everywhere)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
