"""CPU threads for the encoder: the CPUs this process may really use, not the machine's core count.

torch's default intra-op thread count follows the CPUs the OS reports, which is wrong in two common cases: a
container whose CPU quota (cgroup `cpu.max`, `docker --cpus`) is smaller than the visible CPUs (the threads then
take turns on the quota and every GEMM waits for its slowest thread), and a process pinned to fewer CPUs
(`taskset`, Slurm, torchrun with affinity) when OpenMP was initialised before the pinning. `usable_cpus()` is the
minimum of the affinity mask and the quota; `apply_default_threads()` lowers torch's count to it (it never raises it), and leaves
an explicit OMP_NUM_THREADS / MKL_NUM_THREADS alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

_EXPLICIT_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), None when unlimited."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus() -> int:
    """The CPUs this process can run on at once: affinity mask, capped by the cgroup quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def apply_default_threads() -> int:
    """Lower torch's intra-op threads to `usable_cpus()` unless the user chose a count; returns the count used."""
    if any(os.environ.get(name) for name in _EXPLICIT_ENV):
        return torch.get_num_threads()
    usable = usable_cpus()
    if torch.get_num_threads() > usable:
        torch.set_num_threads(usable)
    return torch.get_num_threads()
