"""The CPUs this process may use (affinity mask, capped by a container's cgroup quota), how busy other processes keep
them, and torch's share of them: for the trainer and the app."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")
# Measured on 2 vCPUs with two other processes busy (docs/train.md): training on 2 threads kept 28% of its quiet speed,
# on 1 thread 53%; OpenMP threads that wait for a core stall each other. So with a core's worth of other work, use 1.
BUSY_ELSEWHERE_CPUS = 0.75  # a container's CPU quota: cpu.max (cgroup v2) or cpu/cpu.cfs_quota_us (v1)


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


def _busy_jiffies() -> int | None:
    try:
        fields = [int(v) for v in PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait


def busy_elsewhere(seconds: float = 0.3) -> float:
    """How many CPUs other processes keep busy, measured over `seconds` (0 where /proc/stat cannot be read)."""
    before, mine = _busy_jiffies(), time.process_time()
    if before is None:
        return 0.0
    time.sleep(seconds)
    after = _busy_jiffies()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, ((after or before) - before) / tick - (time.process_time() - mine)) / seconds


def default_threads(busy: float | None = None) -> int:
    """torch threads for a job that has the machine to itself: every available CPU, but 1 while other processes keep
    at least BUSY_ELSEWHERE_CPUS busy (busy: that figure, measured here when not given)."""
    busy = busy_elsewhere() if busy is None else busy
    return 1 if busy >= BUSY_ELSEWHERE_CPUS else available_cpus()
