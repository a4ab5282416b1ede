"""Thread defaults: the CPUs a process may use (affinity mask, cgroup quota), never more than torch's own count."""

from __future__ import annotations

import os

import pytest
import torch

from samadapt.utils import threads as T


def _cgroup(tmp_path, v2: str | None = None, v1: tuple[int, int] | None = None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("v2", "v1", "expected"),
    [
        ("150000 100000", None, 1.5),  # docker --cpus=1.5 (cgroup v2)
        ("max 100000", None, None),  # unlimited
        (None, (200000, 100000), 2.0),  # cgroup v1
        (None, (-1, 100000), None),  # v1 unlimited
        (None, None, None),  # no cgroup files (macOS, old kernels)
    ],
)
def test_cgroup_quota(tmp_path, v2, v1, expected):
    assert T.cgroup_cpu_quota(_cgroup(tmp_path, v2, v1)) == expected


def test_usable_cpus_is_the_affinity_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(T, "cgroup_cpu_quota", lambda: 1.5)
    assert T.usable_cpus() == 2  # a 64-CPU host, a 1.5-CPU container
    monkeypatch.setattr(T, "cgroup_cpu_quota", lambda: None)
    assert T.usable_cpus() == 64
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert T.usable_cpus() == 1  # taskset -c 3


def test_apply_default_threads_only_lowers_and_respects_the_environment(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(T, "usable_cpus", lambda: 1)
        assert T.apply_default_threads() == 1 == torch.get_num_threads()
        monkeypatch.setattr(T, "usable_cpus", lambda: 8)
        assert T.apply_default_threads() == 1  # never raised above what torch (or the user) set
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(T, "usable_cpus", lambda: 1)
        assert T.apply_default_threads() == 2  # the user's explicit choice stands
    finally:
        torch.set_num_threads(before)


def test_this_process_has_at_least_one_usable_cpu():
    assert 1 <= T.usable_cpus() <= (os.cpu_count() or 1)
