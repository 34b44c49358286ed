"""Data-parallel training under torchrun: the process group, this process's rank, and the few collectives the loop needs.

Without torchrun (no RANK/WORLD_SIZE in the environment) everything here is a no-op for a world of one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_MINUTES = 5.0  # a collective that waits longer than this (a dead or hung peer) ends the run with an error


class PeerError(RuntimeError):
    """Another training process died or stopped answering; the message says how to continue."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its global rank, its rank on this machine and the number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        """Rank 0: the only process that evaluates, prints, logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK when training on CUDA with several processes, else unchanged."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of value over all processes (all_reduce), e.g. the loss each rank measured on its own batches."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        _collective(dist.all_reduce, t)
        return float(t.item()) / self.world_size

    def from_master(self, values: list[float], device: torch.device) -> list[float]:
        """Rank 0's values on every rank (broadcast): decisions that depend on a clock must be taken once for all."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        _collective(dist.broadcast, t, src=0)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            _collective(dist.barrier)


@contextlib.contextmanager
def peer_errors() -> Iterator[None]:
    """Turn a failed collective (a peer died, or did not answer within the timeout) into a PeerError with one clear sentence.

    gloo reports a lost peer as a plain RuntimeError, so within a process group every RuntimeError here counts as one.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise  # this process's own problem, whatever its peers do
    except RuntimeError as e:
        if not dist.is_initialized():
            raise
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PeerError(f"another training process died or stopped answering ({detail}); the run stops here: "
                        "fix the cause and continue with --resume.") from None


def _collective(fn, *args, **kwargs) -> None:
    with peer_errors():
        fn(*args, **kwargs)


def launched_world_size() -> int:
    """How many processes torchrun started (WORLD_SIZE), 1 when this is a plain python run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Dist:
    """Join the process group torchrun described in the environment: NCCL on CUDA (one GPU per rank), gloo on the CPU.

    Returns a world of one without torchrun. Idempotent: a second call returns the same ranks.
    """
    world = launched_world_size()
    if world <= 1:
        return Dist()
    info = Dist(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return info


def teardown() -> None:
    """Leave the process group (if any), so the process exits cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()
