"""A run's wall-clock budget, and every question about time: how long the run has gone, what to keep for the final
evaluation and writes, whether the next step still fits, when a validation curve point is due, and where the
learning-rate schedule stands: warmup by steps (or by time when the budget is short), then the decay by steps, or by
time when the budget ends the run sooner, so the decay ends with the budget."""

from __future__ import annotations

import time
from typing import Any

from model.training.optim import warmup_frac
from model.training.settings import ArgError

WARMUP_BUDGET_SHARE = 0.05  # with a time budget, warmup ends after this share of the training time at the latest
CURVE_POINTS = 16  # a budgeted run scores validation at least this often over its budget, so even 1 minute draws a curve


def minutes_text(minutes: float) -> str:
    """A budget as a person reads it: "9.5 min" as given, and one of whole seconds that is no round number of minutes
    (a round's, see model/training/rounds.py) as "29 min 56 s" rather than "29.9333 min"."""
    if minutes == round(minutes, 2):
        return f"{minutes:g} min"
    whole, seconds = divmod(round(minutes * 60), 60)
    return f"{whole} min {seconds} s" if whole else f"{seconds} s"


class Budget:
    """The clock of one run (earlier sessions of a resumed run included) and its schedule's fractions."""

    def __init__(self, max_minutes: float, max_iters: int, warmup_iters: int, t_start: float | None = None):
        self.minutes = max_minutes
        self.seconds = max_minutes * 60.0 if max_minutes else None
        self.max_iters, self.warmup_iters = max_iters, warmup_iters
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.elapsed_before = 0.0  # seconds of earlier sessions (--resume)
        self.t_loop: float | None = None  # elapsed seconds when the first training step ended (torch.compile's excluded)
        self.t_warm: float | None = None  # elapsed seconds when warmup ended (the time-based decay starts there)
        self.step_seconds = 0.0  # a smoothed step time: the next step is expected to take this long
        self.eval_sec_per_token = 0.0  # measured by the evaluations
        self.sample_seconds = 0.0  # an evaluation's sample
        self.save_seconds = 0.0  # the last save's time
        self.final_tokens = 0  # tokens the final evaluation will score (0: the best evaluation's score is already final)
        self.eval_tokens = 0  # tokens one evaluation during training scores
        self.t_scored = 0.0  # elapsed seconds at the last validation score

    @property
    def limited(self) -> bool:
        """Whether the run has a time budget (--max-minutes > 0)."""
        return self.seconds is not None

    def elapsed(self) -> float:
        """Wall-clock seconds of this run so far."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def evaluated(self, seconds: float, tokens: int, sample_seconds: float | None = None) -> None:
        """Record an evaluation's time (its rate, and its sample's time, price the reserve) and that validation was just scored."""
        self.eval_sec_per_token = seconds / max(tokens, 1)
        if sample_seconds is not None:
            self.sample_seconds = sample_seconds
        self.t_scored = self.elapsed()

    def saved(self, seconds: float) -> None:
        self.save_seconds = seconds

    def expect(self, final_tokens: int, eval_tokens: int) -> None:
        """What follows training, for the reserve: a final evaluation of final_tokens (0: none) after evaluations of eval_tokens."""
        self.final_tokens, self.eval_tokens = final_tokens, eval_tokens

    @property
    def reserve(self) -> float:
        """Seconds kept at the end of the budget: the final evaluation, one more evaluation with its sample, two saves and
        a second's slack (none before an evaluation has been timed)."""
        if self.eval_sec_per_token == 0:
            return 0.0
        evaluations = self.eval_sec_per_token * (1.2 * self.final_tokens + self.eval_tokens) + self.sample_seconds
        return evaluations + 2 * self.save_seconds + 1.0

    def curve_point_due(self) -> bool:
        """Whether a budgeted run should score validation now (a cheap estimate) to draw its curve: once every
        1/CURVE_POINTS of the budget without another score."""
        return self.limited and self.elapsed() - self.t_scored >= self.seconds / CURVE_POINTS

    def too_short(self) -> ArgError:
        """The error of a new run whose budget ran out before its first step."""
        return ArgError(f"--max-minutes {self.minutes:g} ({self.seconds:g} s in all) is too short to train a single step: "
                        f"start-up and the first evaluation took {self.elapsed():.1f} s, and the final evaluation and writes "
                        f"need about {self.reserve:.1f} s more; give a larger --max-minutes, or 0 for no time limit.")

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
        """The clock a resumed run continues from (plain numbers, in train_state.pt beside the run's RunState)."""
        return {"elapsed": self.elapsed(), "t_loop": self.t_loop, "t_warm": self.t_warm, "eval_sec_per_token": self.eval_sec_per_token}

    def restore(self, state: dict[str, Any]) -> None:
        self.elapsed_before, self.t_loop, self.t_warm = float(state["elapsed"]), state["t_loop"], state["t_warm"]
        self.eval_sec_per_token = float(state["eval_sec_per_token"])
        self.t_scored = self.elapsed_before

