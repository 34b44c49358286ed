"""Serving and training on the same CPUs, as the app's Train tab does: request time during a training, and training
throughput while requests arrive, for each trainer thread count.

    python bench/app_training.py --ckpt out/int8                      # trainer threads 1 and 2, 1-minute trainings
    python bench/app_training.py --ckpt out/int8 --train-threads 1 --minutes 2 --clients 2

The app runs in this process (its default pool: one model copy per request slot); each training is the Train tab's job
(train.py, then quantize.py, in child processes) on the committed input.txt. Cells: requests alone; for each thread
count, the training alone, then the training while clients send the default request back to back. Run it on a quiet
machine: it measures how the two share the cores, so anything else running makes the numbers meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client  # noqa: E402

from model import atomic  # noqa: E402
from model.cpus import available_cpus  # noqa: E402
from model.formats.checkpoint import CheckpointError, default_checkpoint  # noqa: E402
from model.tokenizer import TokenizerError  # noqa: E402
from model.webapp.limits import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEQUENCES, DEFAULT_TOP_K  # noqa: E402
from model.webapp.pool import ModelPool  # noqa: E402
from model.webapp.server import launch  # noqa: E402
from model.webapp.training_job import TrainingJob  # noqa: E402

PROMPT = "ROMEO:\n"


def request_seconds(client: Client, seed: int) -> float:
    """Seconds for one default request (3 x 200 tokens, top-k 50), streamed to the end."""
    start = time.perf_counter()
    client.predict(prompt=PROMPT, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, num_sequences=DEFAULT_SEQUENCES, top_k=DEFAULT_TOP_K,
                   seed=seed, api_name="/generate")
    return time.perf_counter() - start


def send_requests(url: str, clients: int, until: threading.Event) -> list[float]:
    """Each of `clients` clients sends the default request back to back until `until` is set; every request's seconds."""
    times: list[float] = []

    def client_loop(c: int) -> None:
        client = Client(url, verbose=False)
        seed = 1000 * c
        while not until.is_set():
            times.append(request_seconds(client, seed))
            seed += 1

    workers = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return times


def training_tokens_per_s(job: TrainingJob) -> float:
    """Median training tokens/s the trainer logged (its smoothed rate, records after the first quarter of the run)."""
    rates = [r["tokens_per_s"] for r in job.status().records if "tokens_per_s" in r]
    return statistics.median(rates[len(rates) // 4:]) if rates else float("nan")


def wait_for_training(job: TrainingJob) -> None:
    """Until the trainer has logged its first training records (start-up, tokenising and the first evaluation are over)."""
    while job.state == "running" and not any("train_loss" in r for r in job.status().records):
        time.sleep(0.5)


def run_training(root: Path, text: str, minutes: float, threads: int, url: str | None, clients: int) -> dict:
    """One training; with url, clients send requests while it trains. Its tokens/s and the requests' seconds."""
    job = TrainingJob(root, text, minutes, threads=threads)
    try:
        wait_for_training(job)
        until = threading.Event()
        times: list[float] = []
        sender = None
        if url is not None:
            sender = threading.Thread(target=lambda: times.extend(send_requests(url, clients, until)))
            sender.start()
        while job.state == "running":
            time.sleep(0.5)
        until.set()
        if sender is not None:
            sender.join()
        return {"train_threads": threads, "with_requests": url is not None, "tokens_per_s": training_tokens_per_s(job),
                "request_s": times, "state": job.state}
    finally:
        job.stop()
        job.discard()


def p(values: list[float], q: float) -> float:
    """The q-quantile of values (nearest rank), nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint the app serves (default: $SMALLGPT_CKPT, else out/int8)")
    ap.add_argument("--data", type=Path, default=ROOT / "input.txt", help="text the trainings train on")
    ap.add_argument("--train-threads", type=int, nargs="+", default=[1, 2], help="trainer thread counts to compare")
    ap.add_argument("--minutes", type=float, default=1.0, help="budget of each training (start-up included)")
    ap.add_argument("--clients", type=int, default=1, help="clients sending requests back to back during a training")
    ap.add_argument("--alone-seconds", type=float, default=30.0, help="how long requests are timed with no training")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/app_training.json", help="JSON to write")
    args = ap.parse_args()
    try:
        pool = ModelPool(args.ckpt or default_checkpoint())
    except (CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = args.data.read_text(encoding="utf-8")
    demo = launch(pool, host="127.0.0.1", port=None, prevent_thread_lock=True)
    rows = []
    try:
        request_seconds(Client(demo.local_url, verbose=False), seed=0)  # warm-up
        until = threading.Event()
        threading.Timer(args.alone_seconds, until.set).start()
        alone = send_requests(demo.local_url, args.clients, until)
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:  # a discarded job goes a moment later
            for threads in args.train_threads:
                for url in (None, demo.local_url):
                    rows.append(run_training(Path(tmp), text, args.minutes, threads, url, args.clients))
                    print(f"trainer {threads} thread(s), {'with' if url else 'without'} requests: "
                          f"{rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    finally:
        demo.close()
    print(f"\n{available_cpus()} CPUs; app: {pool.size} model copies; {args.clients} client(s) sending the default request "
          f"({DEFAULT_SEQUENCES} x {DEFAULT_MAX_NEW_TOKENS} tokens)")
    print(f"requests alone: p50 {p(alone, 0.5):.2f} s, p95 {p(alone, 0.95):.2f} s ({len(alone)} requests)")
    print("| trainer threads | training tok/s alone | with requests | ratio | request p50 during training | p95 | requests |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.train_threads:
        solo = next(r for r in rows if r["train_threads"] == threads and not r["with_requests"])
        busy = next(r for r in rows if r["train_threads"] == threads and r["with_requests"])
        print(f"| {threads} | {solo['tokens_per_s']:,.0f} | {busy['tokens_per_s']:,.0f} | "
              f"{busy['tokens_per_s'] / solo['tokens_per_s']:.2f} | {p(busy['request_s'], 0.5):.2f} s | "
              f"{p(busy['request_s'], 0.95):.2f} s | {len(busy['request_s'])} |")
    atomic.write_text(args.out, json.dumps({"alone_request_s": alone, "runs": rows, "clients": args.clients,
                                            "minutes": args.minutes, "cpus": available_cpus()}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
