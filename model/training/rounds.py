"""What a budget buys after the first model: on a small text the cpu preset's size stops learning after a few passes
over it (its cap), long before a generous budget (or a fast machine) ends. The time left trains more models of the same
size on the same text with other seeds (teachers), then a student distilled from them all (model/training/distill.py),
which replaces the first model when it scores better. docs/train.md has the measurements behind the rule."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from model import atomic
from model.formats import checkpoint
from model.formats.checkpoint import CONFIG, LOG, METRICS, PLOT, WEIGHTS
from model.generation.sampling import SEED_MAX
from model.training import distributed
from model.training.settings import layered
from model.training.trainer import TrainResult
from model.training.trainer import train as train_one

ROUNDS = "rounds"  # the folder in --out-dir of the teachers and the student
MAX_TEACHERS = 4  # the largest ensemble a student learns from
# A student's run as a multiple of a teacher's: the run with its teachers' reading of the text, and each teacher's
# forward over it. Fitted on 2 cores to within 13%: students of 1 teacher took 1.05 to 1.18 teacher runs (465 to 490 s),
# of 4 teachers 1.30 (529 s after a 408 s first model); docs/train.md.
STUDENT_RUN, STUDENT_PER_TEACHER = 1.12, 0.05
SHORTEST_ROUND = 0.5  # a later round starts only with at least this share of the time it should take
MODEL_FILES = (WEIGHTS, CONFIG, METRICS, LOG, PLOT)  # what a finished run's folder holds besides its resume state


def student_seconds(teachers: int, round_seconds: float) -> float:
    """About how long a student of this many teachers takes, when a teacher took round_seconds."""
    return (STUDENT_RUN + STUDENT_PER_TEACHER * teachers) * round_seconds


def extra_teachers(left: float, round_seconds: float) -> int | None:
    """How many teachers to train besides the first model (0 to MAX_TEACHERS - 1) when `left` seconds remain and a
    round takes about round_seconds: as many as still leave time for the student. None: not even a student fits."""
    fits = [n for n in range(MAX_TEACHERS) if n * round_seconds + student_seconds(n + 1, round_seconds) <= left]
    return max(fits) if fits else None


def whole_seconds(seconds: float) -> float:
    """A round's budget in whole seconds, rounded down: it stays inside the run's, and its log line stays short."""
    return float(max(math.floor(seconds), 1))


def copy_model(src: Path, dst: Path) -> None:
    """A finished run's model files (not its resume state or token cache) copied into a new folder dst, whole or not at all."""
    with atomic.atomic_dir(dst) as build:
        for name in MODEL_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, build / name)


def promote(src: Path, dst: Path) -> None:
    """Make dst's checkpoint src's model: its files describe either model at every instant, a kill included (the
    metrics, resume state and config of the old model go first, the new config is written after the weights)."""
    for name in (METRICS, checkpoint.TRAIN_STATE, CONFIG):
        (dst / name).unlink(missing_ok=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            atomic.write_bytes(dst / name, (src / name).read_bytes())


def wanted(given: dict[str, Any], first: TrainResult) -> bool:
    """Whether rounds may follow the first run: a new single-process run that the size's cap, not the budget, ended."""
    return (first.capped and first.metrics is not None and not given.get("teacher") and not given.get("resume")
            and distributed.launched_world_size() == 1)


def train(given: dict[str, Any], stop_after: int | None = None, t_start: float | None = None) -> TrainResult:
    """Train the first model; then, if its cap left enough of the budget, teachers and a student (see the module).

    Returns the result of the model --out-dir holds at the end (the student's when it won)."""
    t_start = time.perf_counter() if t_start is None else t_start
    s = layered(given)
    rounds = Path(s.out_dir) / ROUNDS
    first = train_one(given, stop_after, t_start)
    if first.metrics is not None and not given.get("resume") and not given.get("teacher"):
        shutil.rmtree(rounds, ignore_errors=True)  # an earlier run's, whose model this run has replaced in --out-dir
    if not wanted(given, first):
        return first
    deadline = t_start + s.max_minutes * 60.0
    round_seconds = time.perf_counter() - t_start
    extra = extra_teachers(deadline - time.perf_counter(), round_seconds)
    if extra is None:
        return first
    out = Path(s.out_dir)
    plan = (f"{extra} more teacher{'s' if extra > 1 else ''} with other seeds, then a student distilled from all "
            f"{extra + 1}" if extra else "a student distilled from it")
    print(f"\n{(deadline - time.perf_counter()) / 60:.1f} of the {s.max_minutes:g} minutes are left after the first model "
          f"({round_seconds / 60:.1f} min): training {plan}, in {rounds}/", flush=True)
    copy_model(out, rounds / "teacher-1")
    teachers = [rounds / "teacher-1"]
    for i in range(2, extra + 2):
        now = time.perf_counter()
        seconds = deadline - now - student_seconds(extra + 1, round_seconds)  # what the student will need stays free
        if seconds < SHORTEST_ROUND * round_seconds:  # the rounds ran slower than the first model: fewer teachers
            break
        result = train_one({**given, "seed": (s.seed + i - 1) % (SEED_MAX + 1), "out_dir": str(rounds / f"teacher-{i}"),
                            "max_minutes": whole_seconds(seconds) / 60.0}, t_start=now)
        if result.metrics is None:  # interrupted: its folder says how to resume it
            return result
        teachers.append(rounds / f"teacher-{i}")
    now = time.perf_counter()
    if deadline - now < SHORTEST_ROUND * student_seconds(len(teachers), round_seconds):
        print(f"only {deadline - now:.0f} s are left, too little for a student: {out}/ keeps the first model")
        return first
    student = train_one({**given, "teacher": [str(t) for t in teachers], "out_dir": str(rounds / "student"),
                         "max_minutes": whole_seconds(deadline - now) / 60.0}, t_start=now)
    if student.metrics is None:
        return student
    ours, theirs = student.metrics["val_nats_per_char"], first.metrics["val_nats_per_char"]
    if ours < theirs:
        promote(rounds / "student", out)
        whole = {"teachers": len(teachers), "first_model_val_nats_per_char": theirs,
                 "command_seconds": round(time.perf_counter() - t_start, 2)}  # the rounds together, the first model's included
        checkpoint.write_json(out / METRICS, {**checkpoint.read_json(out / METRICS), **whole})
        print(f"the student scores {ours:.4f} nats/char against the first model's {theirs:.4f}: {out}/ holds the student "
              f"now (the first model is {rounds / 'teacher-1'}/)")
        return student
    print(f"the student scores {ours:.4f} nats/char, not better than the first model's {theirs:.4f}: {out}/ keeps the "
          "first model")
    return first
