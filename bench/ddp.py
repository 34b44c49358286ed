"""Training tokens/s of one process versus two torchrun processes on this machine, alternating rounds, median of rounds.

    python bench/ddp.py [--data PATH] [--chars 100000] [--preset tiny] [--batch-size 8] [--steps 20] [--rounds 3] [--png ...]
Every run is a real `train.py` run with the same global batch (--batch-size B --grad-accum 2: one process runs two
micro-steps, two processes one each); the rate is measured from log.jsonl between step 5 and the last step (no evals).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402  (the Agg backend: model.plot selects it)

from model.formats.checkpoint import CONFIG, LOG, read_json, read_log  # noqa: E402  # noqa: E402
from model.plot import save_figure  # noqa: E402

SKIP = 5  # steps left out of the rate: start-up, first allocations
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
SETUPS = {  # name: (launcher, extra flags)
    "1 process, 1 thread": ([sys.executable], ["--threads", "1"]),
    "1 process, 2 threads": ([sys.executable], ["--threads", "2"]),
    "2 processes x 1 thread": (TORCHRUN, ["--threads", "1"]),
}


def tokens_per_s(out: Path) -> float:
    """Training tokens per second (all ranks) between step SKIP and the last step, from the run's log.jsonl."""
    rows = [r for r in read_log(out / LOG) if "train_loss" in r]
    config = read_json(out / CONFIG)["train"]
    first = next(r for r in rows if r["step"] == SKIP)
    tokens = (rows[-1]["step"] - SKIP) * config["batch_size"] * config["grad_accum"] * config["block_size"]
    return tokens / (rows[-1]["elapsed"] - first["elapsed"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "input.txt"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8, help="per process per micro-step")
    p.add_argument("--chars", type=int, default=100_000, help="train on the first N characters (a short final evaluation)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--png", default=str(ROOT / "bench" / "results" / "ddp.png"))
    a = p.parse_args()
    flags = ["--preset", a.preset, "--batch-size", str(a.batch_size), "--grad-accum", "2", "--max-iters", str(a.steps),
             "--eval-interval", str(10**6), "--eval-windows", "1", "--log-interval", "1", "--max-minutes", "0", "--dtype", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rates: dict[str, list[float]] = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.txt"
        data.write_text(Path(a.data).read_text(encoding="utf-8")[:a.chars], encoding="utf-8")
        flags += ["--data", str(data)]
        for r in range(a.rounds):
            order = list(SETUPS) if r % 2 == 0 else list(reversed(SETUPS))
            for name in order:
                launcher, extra = SETUPS[name]
                out = Path(tmp) / name.replace(" ", "_")
                run = subprocess.run([*launcher, "train.py", *flags, "--out-dir", str(out), *extra], cwd=ROOT, env=env,
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    sys.exit(f"error: {name} failed: {run.stderr[-1500:]}")
                rates[name].append(tokens_per_s(out))
                print(f"round {r}: {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    base = medians["1 process, 1 thread"]
    for name, m in medians.items():
        print(f"median {name}: {m:,.0f} tokens/s ({m / base:.2f}x of 1 process, 1 thread)")
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(list(medians), list(medians.values()), color=["#888", "#59c", "#c75"])
    for i, m in enumerate(medians.values()):
        ax.text(m, i, f" {m:,.0f}", va="center")
    ax.set_xlabel("training tokens/s (median of rounds)")
    ax.set_title(f"preset {a.preset}, global batch {2 * a.batch_size} sequences, {os.cpu_count()} CPU cores")
    ax.set_xlim(0, max(medians.values()) * 1.25)
    save_figure(fig, a.png)
    print(f"plot: {a.png}")


if __name__ == "__main__":
    main()
