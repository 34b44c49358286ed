"""Benchmark: generation tokens/s of the naive loop against our KV-cached batched engine, fp32 and int8.

    python bench/generation.py --ckpt out                 # a trained checkpoint (int8: out/int8, else quantized here)
    python bench/generation.py --random 6x384x256         # a random-weight model of that shape: same speed as trained
Grid: fp32 / int8 x prompts of 8 / 512 tokens x 1 / 3 return sequences, top-k 50, 200 new tokens per sequence, for
  naive       the original loop: one sequence at a time, the plain forward over the whole window every step
  naive-last  the same, but computing the logits of the last position only (nanoGPT's trick)
  ours-eager  model.generate's engine run eagerly: one prompt prefill, all sequences decoded together over a KV cache
  ours        the same engine as the app runs it: its one-token steps and window slides replay TorchScript traces
The naive loops handle sequences one after another, so their tokens/s does not depend on the number of return
sequences: they are timed with one. Every repeat runs every cell once, in turn, so load from other processes
hits all alike; tokens/s is the median over repeats, a speed-up the median of the per-repeat ratios.
It also times, for the int8 model, the int8 Linear kernels of one decode step on their own: a floor for a step.
Writes bench/results/generation.json and generation.png. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.ao.nn.quantized.dynamic as nnqd  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import atomic  # noqa: E402
from model.checkpoint import CheckpointError  # noqa: E402
from model.config import GPTConfig, preset  # noqa: E402
from model.generate import SamplingConfig, decode_tokens, naive_tokens  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.load import load  # noqa: E402
from model.plot import plt, save_figure  # noqa: E402
from model.tokenizer import TokenizerError, gpt2, padded_vocab_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NAIVE = ("naive", "naive-last")
OURS = ("ours-eager", "ours")
PROMPT = "Hello, my name is"  # the app's example prompt; repeated and cut to the wanted token counts


def prompt_of(tokenizer, n_tokens: int) -> list[int]:
    """Exactly n_tokens prompt tokens, from the app's prompt repeated."""
    ids = tokenizer.encode(PROMPT)
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def models_to_bench(args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module], object, str]:
    """{"fp32": model, "int8": model}, the tokenizer and a sentence saying where they came from."""
    if args.random:
        tokenizer = gpt2()
        torch.manual_seed(0)
        if "x" in args.random:  # layers x width x context, 64-wide heads
            try:
                n_layer, n_embd, block = (int(v) for v in args.random.split("x"))
            except ValueError:
                raise ValueError(f"--random {args.random}: give a preset name or LAYERSxWIDTHxCONTEXT, e.g. 6x384x256.") from None
            cfg = GPTConfig(block_size=block, n_layer=n_layer, n_head=max(n_embd // 64, 1), n_embd=n_embd)
        else:
            cfg = preset(args.random)
        cfg.vocab_size = padded_vocab_size(tokenizer.n_vocab)
        cfg.dropout = 0.0
        fp32, source = GPT(cfg).eval(), f"random-weight {args.random} ({cfg.n_layer} layers x {cfg.n_embd}, context {cfg.block_size})"
    else:
        loaded = load(args.ckpt)
        fp32, tokenizer, source = loaded.model, loaded.tokenizer, f"checkpoint {args.ckpt}"
        if loaded.kind != "fp32":
            raise CheckpointError(f"{args.ckpt} holds a {loaded.kind} checkpoint; pass the fp32 one as --ckpt (int8 as --int8-ckpt).")
    int8_dir = Path(args.int8_ckpt) if args.int8_ckpt else (Path(args.ckpt) / "int8" if not args.random else None)
    if int8_dir is not None and int8_dir.exists():
        loaded8 = load(int8_dir)
        if loaded8.kind != "int8":
            raise CheckpointError(f"{int8_dir} holds a {loaded8.kind} checkpoint, not int8: make one with python quantize.py.")
        int8, how = loaded8.model, f"int8 from {int8_dir}"
    else:
        if args.int8_ckpt:
            raise CheckpointError(f"No int8 checkpoint at {args.int8_ckpt}: make one with python quantize.py, or leave --int8-ckpt out.")
        from model.quantize import quantize_model

        int8, how = quantize_model(fp32), "int8 quantized here (model.quantize)"
    return {"fp32": fp32, "int8": int8}, tokenizer, f"{source}; {how}"


def time_cell(engine: str, model: torch.nn.Module, prompt_ids: list[int], num_samples: int,
              sampling: SamplingConfig, n_vocab: int) -> float:
    """Seconds to produce num_samples x max_new_tokens tokens with one engine."""
    start = time.perf_counter()
    if engine.startswith("naive"):  # one sequence at a time, as the original Space did
        gen = torch.Generator().manual_seed(0)
        for _ in range(num_samples):
            naive_tokens(model, prompt_ids, sampling, n_vocab, gen, last_only=engine == "naive-last")
    else:
        for _ in decode_tokens(model, prompt_ids, num_samples, sampling, n_vocab, traced=engine == "ours"):
            pass
    return time.perf_counter() - start


class _Linears(torch.nn.Module):
    """Each Linear applied to its own input: a decode step's matrix products without anything in between."""

    def __init__(self, linears: list[torch.nn.Module]):
        super().__init__()
        self.linears = torch.nn.ModuleList(linears)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(linear(x) for linear, x in zip(self.linears, xs, strict=True))


@torch.inference_mode()
def int8_linear_ms(model: torch.nn.Module, batch: int, repeats: int = 200) -> tuple[float, int]:
    """Milliseconds that one decode step's int8 Linear kernels take on their own, replayed as one TorchScript trace
    (as the engine runs them; batch rows of one token; median of 5 rounds), and how many there are: a floor."""
    linears = [m for m in model.modules() if isinstance(m, nnqd.Linear)]
    xs = tuple(torch.randn(batch, 1, m.in_features) for m in linears)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = torch.jit.trace(_Linears(linears), xs, check_trace=False)
    rounds = []
    for _ in range(6):  # the first round warms up (TorchScript optimizes a trace over its first calls)
        start = time.perf_counter()
        for _ in range(repeats):
            traced(*xs)
        rounds.append((time.perf_counter() - start) / repeats * 1e3)
    return statistics.median(rounds[1:]), len(linears)


def run(args: argparse.Namespace) -> dict:
    models, tokenizer, source = models_to_bench(args)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=50, seed=0)
    # Each engine right after the naive loops on the same weights and prompt, so compared cells run close in time.
    cells = [c for p in args.prompt_tokens for kind in models
             for c in [(e, kind, 1, p) for e in NAIVE] + [(e, kind, n, p) for n in args.num_samples for e in OURS]]
    times: dict[tuple, list[float]] = {c: [] for c in cells}
    prompts = {p: prompt_of(tokenizer, p) for p in args.prompt_tokens}
    warm = SamplingConfig(max_new_tokens=models["fp32"].config.block_size + 2)  # past the context: a slide too
    for model in models.values():  # warm-up: first calls allocate, pick kernels and make the traces
        for n in sorted(args.num_samples, reverse=True):  # the largest first: its caches then serve all
            for engine in OURS:
                time_cell(engine, model, prompts[args.prompt_tokens[0]], n, warm, tokenizer.n_vocab)
    with tqdm(total=len(cells) * args.repeats, desc="generation bench", unit="cell") as bar:
        for _ in range(args.repeats):
            for cell in cells:
                engine, kind, n, p = cell
                times[cell].append(time_cell(engine, models[kind], prompts[p], n, sampling, tokenizer.n_vocab))
                bar.update()
    rows = []
    for engine, kind, n, p in cells:
        secs = statistics.median(times[(engine, kind, n, p)])
        rows.append({"engine": engine, "weights": kind, "num_samples": n, "prompt_tokens": p,
                     "new_tokens": n * args.max_new_tokens, "seconds": secs, "tokens_per_s": n * args.max_new_tokens / secs,
                     "all_seconds": times[(engine, kind, n, p)]})
    for r in rows:  # speed-up of ours over the naive loops (and of the traced engine over the eager one)
        if r["engine"] in OURS:
            for e in NAIVE + ("ours-eager",):
                # Median over repeats of the ratio within each repeat: robust to load that changes between repeats.
                base = naive_of(rows, r, e)
                pairs = zip(r["all_seconds"], base["all_seconds"], strict=True)
                ratios = [(r["new_tokens"] / t) / (base["new_tokens"] / b) for t, b in pairs]
                r[f"speedup_vs_{e}"] = statistics.median(ratios)
    floor_ms, n_linears = int8_linear_ms(models["int8"], max(args.num_samples))
    return {"source": source, "block_size": models["fp32"].config.block_size, "max_new_tokens": args.max_new_tokens,
            "top_k": 50, "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "rows": rows,
            "int8_linears_per_step": n_linears, "int8_linear_ms_per_step": floor_ms, "floor_batch": max(args.num_samples)}


def naive_of(rows: list[dict], r: dict, engine: str) -> dict:
    """The row of engine with the same weights and prompt as row r (the same number of sequences, for ours)."""
    keys = ("weights", "prompt_tokens") + (("num_samples",) if engine in OURS else ())
    return next(b for b in rows if b["engine"] == engine and all(b[k] == r[k] for k in keys))


def table(result: dict) -> str:
    """A Markdown table of the results."""
    lines = ["| prompt tokens | return seqs | weights | naive tok/s | naive-last tok/s | ours eager tok/s | ours tok/s "
             "| ours / naive | ours / naive-last | traced / eager |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["engine"] != "ours":
            continue
        a, b, c = (naive_of(result["rows"], r, e)["tokens_per_s"] for e in NAIVE + ("ours-eager",))
        lines.append(f"| {r['prompt_tokens']} | {r['num_samples']} | {r['weights']} | {a:.1f} | {b:.1f} | {c:.1f} "
                     f"| {r['tokens_per_s']:.1f} | {r['speedup_vs_naive']:.1f}x | {r['speedup_vs_naive-last']:.1f}x "
                     f"| {r['speedup_vs_ours-eager']:.2f}x |")
    return "\n".join(lines)


def anatomy(result: dict) -> str:
    """A line on the int8 decode step of the most sequences, shortest prompt: its time against its kernels' floor."""
    rows = [r for r in result["rows"] if r["engine"] == "ours" and r["weights"] == "int8" and r["num_samples"] == result["floor_batch"]]
    r = min(rows, key=lambda r: r["prompt_tokens"])
    step_ms = r["seconds"] / result["max_new_tokens"] * 1e3
    naive = naive_of(result["rows"], r, "naive")
    budget_ms = r["num_samples"] / (20 * naive["tokens_per_s"]) * 1e3  # per-step time at which ours / naive = 20
    return (f"int8, {r['num_samples']} sequences, {r['prompt_tokens']}-token prompt: ours takes {step_ms:.3f} ms a step "
            f"(slides, sampling and Python included); its {result['int8_linears_per_step']} int8 Linear kernels alone take "
            f"{result['int8_linear_ms_per_step']:.3f} ms; 20x the naive loop would need {budget_ms:.3f} ms a step.")


def plot(result: dict, path: Path) -> None:
    """Bar chart of tokens/s per cell, naive beside ours (log scale)."""
    ours = [r for r in result["rows"] if r["engine"] == "ours"]
    labels = [f"{r['weights']}\n{r['num_samples']} seq\n{r['prompt_tokens']} tok" for r in ours]
    x = range(len(ours))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ours)), 4))
    bars = (("naive", "naive loop"), ("naive-last", "naive, last-position logits"),
            ("ours-eager", "ours, eager (KV cache, batched)"), ("ours", "ours, traced (as in the app)"))
    for j, (engine, label) in enumerate(bars):
        speeds = [(r if engine == "ours" else naive_of(result["rows"], r, engine))["tokens_per_s"] for r in ours]
        ax.bar([i + (j - 1.5) * 0.2 for i in x], speeds, width=0.2, label=label)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Generation speed, {result['max_new_tokens']} new tokens per sequence, top-k 50")
    ax.legend()
    save_figure(fig, path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--ckpt", default="out", help="fp32 checkpoint directory (default: out)")
    src.add_argument("--random", metavar="SHAPE", help="benchmark a random-weight model with GPT-2's vocabulary instead of a "
                     "checkpoint: a preset name, or LAYERSxWIDTHxCONTEXT such as 6x384x256")
    ap.add_argument("--int8-ckpt", help="int8 checkpoint directory (default: CKPT/int8, else quantize the fp32 model here)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of every cell; the median is reported (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--num-samples", type=int, nargs="+", default=[1, 3], help="return sequences per request (default: 1 3)")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[8, 512], help="prompt lengths in tokens (default: 8 512)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=str(RESULTS / "generation.json"), help="JSON results path (a PNG is written beside it)")
    args = ap.parse_args()
    if args.repeats < 1 or args.max_new_tokens < 1 or min(args.num_samples) < 1 or min(args.prompt_tokens) < 1:
        print("error: --repeats, --max-new-tokens, --num-samples and --prompt-tokens must be positive.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    except (CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    atomic.write_text(out, json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"{result['source']}; context {result['block_size']}, {args.max_new_tokens} new tokens per sequence, "
          f"top-k 50, median of {args.repeats}, {result['torch_threads']} torch threads")
    print(table(result))
    print(anatomy(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
