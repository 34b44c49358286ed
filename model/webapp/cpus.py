"""The CPUs this process may use (affinity mask, capped by a container's cgroup quota) and torch's share of them.
No gradio here: the trainer uses it too."""

from __future__ import annotations

import os
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")  # a container's CPU quota: cpu.max (cgroup v2) or cpu/cpu.cfs_quota_us (v1)


def _cpu_quota(cgroup: Path) -> int | None:
    """Whole CPUs allowed by a cgroup CPU quota (at least 1), or None when there is none or it cannot be read."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()  # v2: "QUOTA PERIOD" or "max PERIOD"
    except (OSError, ValueError):
        try:  # v1: quota -1 means none
            quota, period = ((cgroup / "cpu" / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        except OSError:
            return None
    try:
        return max(1, int(quota) // int(period)) if int(quota) > 0 else None
    except ValueError:  # "max"
        return None


def available_cpus(cgroup: Path | None = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by a container's CPU quota. A 2-vCPU Space runs on a
    bigger host, whose core count os.cpu_count() reports: threads sized by that would fight over 2 CPUs."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cpu_quota(cgroup or CGROUP)
    return max(1, min(n, quota) if quota else n)


def set_threads(concurrency: int) -> int:
    """Give each of `concurrency` jobs running at once an equal share of the available CPUs; returns torch's thread count."""
    threads = max(1, available_cpus() // max(1, concurrency))
    torch.set_num_threads(threads)
    return threads
