"""Latency of the served app as users see it, via gradio_client: time to the first streamed token and to the full answer.

    python bench/app_latency.py --ckpt out/int8                        # 10 default requests (3 x 200 tokens, top-k 50)
    python bench/app_latency.py --ckpt out/int8 --users 16 --requests 3  # 16 users at once, 3 requests each
    python bench/app_latency.py --ckpt out/int8 --users 4 --requests 3 --concurrency 1 2 --rounds 2
    python bench/app_latency.py --ckpt out/int8 --users 16 --requests 3 --seeded-batched  # seeded requests batched
Every request carries a seed (the same numbers each run), and the app decodes a seeded request alone on its copy, so
its text does not depend on the others'; --seeded-batched serves them batched like unseeded ones (the cost of
decoding them alone is the difference), --random-seeds sends seed -1, as the page does by default.
Compares the given numbers of model copies (each decodes its requests together; torch threads = cores / copies),
alternating them round by round, then writes JSON and a PNG plot. The users run in this process, on the same CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import atomic  # noqa: E402
from model.cpus import available_cpus  # noqa: E402
from model.formats.checkpoint import CheckpointError, default_checkpoint  # noqa: E402
from model.plot import save_figure  # noqa: E402
from model.tokenizer import TokenizerError  # noqa: E402
from model.webapp.limits import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEQUENCES, DEFAULT_TOP_K  # noqa: E402
from model.webapp.pool import CONCURRENCY, ModelPool  # noqa: E402
from model.webapp.server import launch  # noqa: E402


def one_request(client: Client, args: argparse.Namespace, seed: int) -> tuple[float, float]:
    """(seconds to the first non-empty streamed text, seconds to the full answer)."""
    start = time.perf_counter()
    first = None
    job = client.submit(prompt=args.prompt, max_new_tokens=args.max_new_tokens, num_sequences=args.num_sequences,
                        top_k=args.top_k, seed=-1 if args.random_seeds else seed, api_name="/generate")
    for update in job:
        if first is None and any(update):
            first = time.perf_counter() - start
    job.result()
    total = time.perf_counter() - start
    return (total if first is None else first), total


def measure(ckpt: Path, copies: int, args: argparse.Namespace, bar: tqdm) -> dict:
    """Serve ckpt in this process on `copies` model copies, then run the users against it."""
    threads = torch.get_num_threads()
    pool = ModelPool(ckpt, copies=copies, seeded_alone=not args.seeded_batched)
    demo = launch(pool, host="127.0.0.1", port=None, prevent_thread_lock=True)
    try:
        used_threads = torch.get_num_threads()
        return {"concurrency": copies, "torch_threads": used_threads, "kind": pool.first.kind, **run_users(demo.local_url, args, bar)}
    finally:
        demo.close()
        torch.set_num_threads(threads)


def run_users(url: str, args: argparse.Namespace, bar: tqdm) -> dict:
    """One warm-up request, then args.users users at once, each sending args.requests requests in turn."""
    one_request(Client(url, verbose=False), args, seed=0)

    def user(c: int) -> list[tuple[float, float]]:
        client = Client(url, verbose=False)
        out = []
        for r in range(args.requests):
            out.append(one_request(client, args, seed=1 + c * args.requests + r))
            bar.update()
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(args.users) as ex:
        timings = [t for part in ex.map(user, range(args.users)) for t in part]
    wall = time.perf_counter() - start
    firsts, totals = [t[0] for t in timings], [t[1] for t in timings]
    return {"p50_first_token_s": statistics.median(firsts), "p50_total_s": statistics.median(totals),
            "p95_total_s": percentile(totals, 95), "max_total_s": max(totals),
            "tokens_per_s": len(timings) * args.num_sequences * args.max_new_tokens / wall,
            "first_token_s": firsts, "total_s": totals}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated (numpy's default)."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Bars of p50 first-token and full-request latency per concurrency (median over rounds)."""
    limits = sorted({r["concurrency"] for r in runs})
    med = {c: {k: statistics.median(r[k] for r in runs if r["concurrency"] == c) for k in ("p50_first_token_s", "p50_total_s")}
           for c in limits}
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    xs = range(len(limits))
    ax.bar([x - 0.2 for x in xs], [med[c]["p50_first_token_s"] for c in limits], 0.4, label="p50 first token")
    ax.bar([x + 0.2 for x in xs], [med[c]["p50_total_s"] for c in limits], 0.4, label="p50 full request")
    ax.set_xticks(list(xs), [f"concurrency {c}" for c in limits])
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    save_figure(fig, path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint to serve (default: $SMALLGPT_CKPT, else out/int8)")
    ap.add_argument("--requests", type=int, default=10, help="timed requests per client, after one warm-up")
    ap.add_argument("--users", "--clients", dest="users", type=int, default=1, help="users sending requests at the same time")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[CONCURRENCY], help="model copies to compare")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over the concurrency limits (alternating)")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--num-sequences", type=int, default=DEFAULT_SEQUENCES)
    ap.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    ap.add_argument("--prompt", default="ROMEO:\n")
    seeds = ap.add_mutually_exclusive_group()
    seeds.add_argument("--seeded-batched", action="store_true",
                       help="serve seeded requests batched with the others, as unseeded ones (default: each alone)")
    seeds.add_argument("--random-seeds", action="store_true", help="send seed -1 (random), as the page does by default")
    ap.add_argument("--url", help="measure an app already running there (python app.py in its own process, as deployed) "
                    "instead of serving --ckpt in this process; --concurrency is then the app's own")
    ap.add_argument("--out", type=Path, default=Path("bench/results/app_latency.json"), help="JSON to write (and .png beside)")
    args = ap.parse_args()
    if min(args.requests, args.users, args.rounds, *args.concurrency) < 1:
        ap.error("--requests, --users, --rounds and --concurrency must be at least 1.")
    if args.url and args.seeded_batched:
        ap.error("--seeded-batched applies to the app this benchmark serves; an app at --url decodes seeded requests alone.")
    ckpt = args.ckpt or default_checkpoint()
    runs = []
    try:
        cells = 1 if args.url else len(args.concurrency)
        with tqdm(total=args.rounds * cells * args.users * args.requests, desc="requests", unit="req") as bar:
            for _ in range(args.rounds):
                if args.url:
                    runs.append({"concurrency": CONCURRENCY, "torch_threads": None, "kind": "app at " + args.url,
                                 **run_users(args.url, args, bar)})
                    continue
                for copies in args.concurrency:
                    runs.append(measure(ckpt, copies, args, bar))
    except (CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup = {"ckpt": args.url or str(ckpt), "users": args.users, "requests_per_client": args.requests, "rounds": args.rounds,
             "max_new_tokens": args.max_new_tokens, "num_sequences": args.num_sequences, "top_k": args.top_k, "cpus": available_cpus(),
             "seeds": "random" if args.random_seeds else "seeded, batched" if args.seeded_batched else "seeded, each alone"}
    atomic.write_text(args.out, json.dumps({"setup": setup, "runs": runs}, indent=2) + "\n")
    plot(runs, args.out.with_suffix(".png"), f"{runs[0]['kind']} {ckpt}: {args.users} user(s), "
         f"{args.num_sequences} x {args.max_new_tokens} tokens, top-k {args.top_k}, {available_cpus()} CPUs")
    print(f"{args.users} user(s) x {args.requests} request(s) of {args.num_sequences} x {args.max_new_tokens} tokens, "
          f"{available_cpus()} CPUs, seeds: {setup['seeds']}")
    print(f"{'copies':>6} {'threads':>7} {'p50 first token':>15} {'p50 request':>11} {'p95 request':>11} {'max request':>11} "
          f"{'tokens/s':>8}")
    for r in runs:
        print(f"{r['concurrency']:>6} {r['torch_threads'] or '-':>7} {r['p50_first_token_s'] * 1000:>12.0f} ms {r['p50_total_s']:>9.2f} s "
              f"{r['p95_total_s']:>9.2f} s {r['max_total_s']:>9.2f} s {r['tokens_per_s']:>8.0f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
