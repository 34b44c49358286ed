"""A run's wall-clock budget and where its learning-rate schedule stands: warmup by steps (or by time when the budget is
short), then the decay by steps, or by time when the budget ends the run sooner, so the decay ends with the budget."""

from __future__ import annotations

import time
from typing import Any

from model.training.optim import warmup_frac

WARMUP_BUDGET_SHARE = 0.05  # with a time budget, warmup ends after this share of the training time at the latest


class Budget:
    """The clock of one run (earlier sessions of a resumed run included) and its schedule's fractions."""

    def __init__(self, max_minutes: float, max_iters: int, warmup_iters: int, t_start: float | None = None):
        self.seconds = max_minutes * 60.0 if max_minutes else None
        self.max_iters, self.warmup_iters = max_iters, warmup_iters
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.elapsed_before = 0.0  # seconds of earlier sessions (--resume)
        self.t_loop: float | None = None  # elapsed seconds when the first training step ended (torch.compile's excluded)
        self.t_warm: float | None = None  # elapsed seconds when warmup ended (the time-based decay starts there)
        self.reserve = 0.0  # seconds kept at the end for evaluations and writes; the trainer keeps it up to date
        self.step_seconds = 0.0  # a smoothed step time: the next step is expected to take this long

    def elapsed(self) -> float:
        """Wall-clock seconds of this run so far."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def train_seconds(self) -> float | None:
        """Seconds training may use (the budget less the reserve), or None without a budget."""
        return None if self.seconds is None else self.seconds - self.reserve

    def warm_frac(self, step: int) -> float:
        """How far warmup has gone: by steps, or by elapsed time when the budget would not leave room for all steps."""
        frac = warmup_frac(step, self.warmup_iters)
        budget = self.train_seconds()
        if budget is not None and self.t_loop is not None:
            frac = max(frac, (self.elapsed() - self.t_loop) / max(1e-9, WARMUP_BUDGET_SHARE * (budget - self.t_loop)))
        return frac

    def decay_frac(self, step: int) -> float:
        """How far the decay has gone: by steps, or by elapsed time when that ends the run sooner."""
        frac = (step - self.warmup_iters) / max(1, self.max_iters - self.warmup_iters)
        budget = self.train_seconds()
        if budget is not None and self.t_warm is not None:
            frac = max(frac, (self.elapsed() - self.t_warm) / max(1e-9, budget - self.t_warm))
        return frac

    def done(self, step: int) -> bool:
        """Whether training is over: max_iters reached, or the next step would run past the budget."""
        budget = self.train_seconds()
        return step >= self.max_iters or (budget is not None and self.elapsed() + self.step_seconds >= budget)

    def fractions(self, step: int) -> tuple[float, float]:
        """The warmup and decay fractions of the step about to run."""
        warm = self.warm_frac(step)
        if warm >= 1.0 and self.t_warm is None:
            self.t_warm = self.elapsed()
        return warm, self.decay_frac(step)

    def took(self, seconds: float) -> None:
        """Record a step's time, smoothed: one step stalled by the machine must not make every next one look as slow.

        The first step starts the training clock when it ends, so a first step that compiles the model (about a minute
        with --compile) does not use up the warmup's share of the budget."""
        if self.t_loop is None:
            self.t_loop = self.elapsed()
        self.step_seconds = seconds if self.step_seconds == 0 else 0.8 * self.step_seconds + 0.2 * seconds

    def state(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed(), "t_loop": self.t_loop, "t_warm": self.t_warm}

    def restore(self, state: dict[str, Any]) -> None:
        self.elapsed_before, self.t_loop, self.t_warm = float(state["elapsed"]), state["t_loop"], state["t_warm"]

