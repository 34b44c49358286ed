"""Benchmark: the budget ladder of the default, `python train.py --max-minutes M --seed S` for each rung, one run at a
time, then val nats/char against minutes as a table and a plot (an earlier default's points beside it with --before).

    python bench/ladder.py --minutes 2.5 5 9.5 20 40 --seeds 1337            runs every rung missing from --runs-dir
    python bench/ladder.py --plot-only --before 9.5:1.4830 20:1.5042 40:1.5066 --plot docs/ladder.png

Not a test: each rung is minutes of training, and what it reaches depends on the machine; run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.formats.checkpoint import METRICS, CheckpointError, read_config, read_json  # noqa: E402
from model.plot import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_name(minutes: float, seed: int, threads: int | None) -> str:
    return f"m{minutes:g}_s{seed}" + (f"_t{threads}" if threads else "")


def point(text: str) -> tuple[float, float]:
    """MINUTES:VAL, a point of the earlier default to draw beside the runs."""
    minutes, val = text.split(":")
    return float(minutes), float(val)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[2.5, 5, 9.5, 20, 40], help="the rungs' --max-minutes")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    p.add_argument("--threads", type=int, default=None, help="--threads for every run (default: train.py's choice)")
    p.add_argument("--runs-dir", default="runs/ladder", help="one checkpoint folder per rung, kept: a rung already there is not run again")
    p.add_argument("--plot-only", action="store_true", help="run nothing; tabulate and plot what --runs-dir holds")
    p.add_argument("--before", type=point, nargs="*", default=[], metavar="MINUTES:VAL", help="an earlier default's points")
    p.add_argument("--plot", default="bench/results/ladder.png")
    a = p.parse_args()
    runs = Path(a.runs_dir)
    rows = []
    for seed in a.seeds:
        for minutes in a.minutes:
            out = runs / run_name(minutes, seed, a.threads)
            if not (out / METRICS).is_file() and not a.plot_only:
                cmd = [sys.executable, "train.py", "--max-minutes", f"{minutes:g}", "--seed", str(seed), "--out-dir", str(out)]
                cmd += ["--threads", str(a.threads)] if a.threads else []
                print("$", " ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, cwd=ROOT, check=True)
            try:
                m = read_json(out / METRICS)
            except CheckpointError:
                continue
            teachers = len(read_config(out)["train"].get("teacher") or [])  # a student's: the budget bought teachers
            rows.append((minutes, seed, m["step"], m.get("tokens_seen"), m["val_nats_per_char"], teachers))
    print("| --max-minutes | seed | the model out/ holds | its steps | tokens seen | val nats/char |\n|---:|---:|---|---:|---:|---:|")
    for minutes, seed, steps, tokens, val, teachers in rows:
        kind = f"a student of {teachers} teacher{'s' if teachers > 1 else ''}" if teachers else "the first model"
        print(f"| {minutes:g} | {seed} | {kind} | {steps:,} | {tokens or 0:,} | {val:.4f} |")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if a.before:
        ax.plot(*zip(*sorted(a.before), strict=True), "s--", color="C7", label="earlier default")
    for seed in a.seeds:
        pts = sorted((r[0], r[4]) for r in rows if r[1] == seed)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=f"default, seed {seed}")
    ax.set(xscale="log", xlabel="--max-minutes (log scale)", ylabel="val nats/char (whole split)",
           title="What more minutes buy: the budget ladder")
    ticks = sorted({*a.minutes, *(m for m, _ in a.before)})
    ax.set_xticks(ticks, labels=[f"{m:g}" for m in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, a.plot)
    print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
