"""Benchmark: generation tokens/s of our engine against the naive loop, and side by side with CTranslate2.

    python bench/generation.py --ckpt out                 # a trained checkpoint (int8: out/int8, else quantized here)
    python bench/generation.py --random 6x384x256         # a random-weight model of that shape: same speed as trained
    python bench/generation.py --only ctranslate2 --busy  # the side-by-side table, also under a competing load
Two parts, each run alternating its cells in every repeat, so load from other processes hits all alike; tokens/s
is the median over repeats. Not a test: numbers depend on the machine and its load.

grid (bench/results/generation.json and .png): fp32 / int8 x prompts of 8 / 512 tokens x 1 / 3 return sequences,
top-k 50, 200 new tokens per sequence, for
  naive       the original loop: one sequence at a time, the plain forward over the whole window every step
  naive-last  the same, but computing the logits of the last position only (nanoGPT's trick)
  ours-eager  model.generate's engine with the eager step: one prompt prefill, all sequences decoded over a KV cache
  ours        the same engine with its fast path (as the app runs it): steps and window slides replay TorchScript traces
  The naive loops handle sequences one after another, so their tokens/s does not depend on the number of return
  sequences: they are timed with one. A speed-up is the median of the per-repeat ratios. It also times, for the int8
  model, the int8 Linear kernels of one decode step on their own: a floor for a step.
ctranslate2 (bench/results/generation_ctranslate2.json): the app's prompt "Hello, my name is", 3 sequences, top-k 50,
temperature 0.8, for ours int8 (the fast path), CTranslate2 int8 and CTranslate2 fp32 (converted from export_hf's
export of the fp32 model), at 1 and 2 threads: 56 new tokens (no window slide), and the app's 200 (window slides:
CTranslate2 cannot go past the context, so those cells are n/a). With --busy every cell also runs while competing
processes keep every core busy with matmuls; contention = busy tok/s / quiet tok/s at the same thread count.
Needs `pip install -r requirements-dev.txt` (ctranslate2, transformers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.ao.nn.quantized.dynamic as nnqd  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import atomic  # noqa: E402
from model.config import GPT2_VOCAB, GPTConfig  # noqa: E402
from model.formats.checkpoint import CheckpointError  # noqa: E402
from model.formats.hf import export_hf, neox_names_for_ctranslate2  # noqa: E402
from model.formats.hf_tokenizer import token_strings  # noqa: E402
from model.formats.load import load  # noqa: E402
from model.generation.generate import SamplingConfig, decode_tokens, naive_tokens, warm_up  # noqa: E402
from model.generation.sampling import Sampler  # noqa: E402
from model.generation.trace import forward_for  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.plot import plt, save_figure  # noqa: E402
from model.tokenizer import TokenizerError, gpt2, padded_vocab_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NAIVE = ("naive", "naive-last")
OURS = ("ours-eager", "ours")
PROMPT = "Hello, my name is"  # the app's example prompt; repeated and cut to the wanted token counts
SIDE_BY_SIDE = {"56 tokens": 56, "app, 200 tokens": 200}  # new tokens per sequence of the side-by-side workloads
SIDE_SEQUENCES, SIDE_TOP_K, SIDE_TEMPERATURE = 3, 50, 0.8
ENGINES = ("ours int8", "CTranslate2 int8", "CTranslate2 fp32")


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
            cfg = GPTConfig(block_size=block, vocab_size=GPT2_VOCAB, n_layer=n_layer, n_head=max(n_embd // 64, 1), n_embd=n_embd)
        else:
            cfg = GPTConfig.from_name(args.random)
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
        from model.formats.int8 import quantize_model

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
        window = prompt_ids[-model.config.block_size:]  # cropped where it enters, as prompt_tokens crops
        for _ in decode_tokens(model, window, num_samples, sampling, n_vocab, traced=engine == "ours"):
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


def run_grid(args: argparse.Namespace, models: dict[str, torch.nn.Module], tokenizer, source: str) -> dict:
    """The grid: naive loops against our engine, eager and traced, fp32 and int8."""
    if args.threads:
        torch.set_num_threads(args.threads)
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


# --- side by side with CTranslate2 ---

def _spin(ready, busy, stop) -> None:
    """A competing process: one thread of fp32 matmuls whenever busy is set, until stop is (another job on the CPU)."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256) / 16
    ready.release()
    while not stop.is_set():
        if busy.wait(0.05):
            for _ in range(20):
                torch.mm(a, a)


@contextmanager
def competing_load(n_procs: int) -> Iterator:
    """n_procs processes, each keeping one core busy whenever the event this yields is set."""
    ctx = multiprocessing.get_context("spawn")  # not fork: torch's thread pools do not survive a fork
    ready, busy, stop = ctx.Semaphore(0), ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=_spin, args=(ready, busy, stop), daemon=True) for _ in range(n_procs)]
    for proc in procs:
        proc.start()
    for _ in procs:  # started (they import torch first): idle from here until busy is set
        ready.acquire()
    try:
        yield busy
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=10)


def ctranslate2_generators(fp32: GPT, tokenizer, workdir: Path, threads: list[int]) -> tuple[dict, list[str]]:
    """{(engine, threads): ctranslate2.Generator} for CTranslate2 int8 and fp32, converted from export_hf's export of
    the fp32 model (as ct2-transformers-converter --quantization does), and the export's token strings by id."""
    import ctranslate2

    export_hf(fp32, tokenizer, workdir / "hf")
    generators = {}
    for engine, quantization in (("CTranslate2 int8", "int8"), ("CTranslate2 fp32", "float32")):
        out = workdir / quantization
        with neox_names_for_ctranslate2():
            ctranslate2.converters.TransformersConverter(str(workdir / "hf")).convert(str(out), quantization=quantization)
        for t in threads:
            generators[(engine, t)] = ctranslate2.Generator(str(out), device="cpu", intra_threads=t)
    return generators, token_strings(workdir / "hf")


def time_side_cell(engine: str, threads: int, new_tokens: int, int8: torch.nn.Module, prompt_ids: list[int], n_vocab: int,
                   generators: dict, strings: list[str]) -> float:
    """Seconds for SIDE_SEQUENCES x new_tokens tokens: ours int8 with its traced steps, or a CTranslate2 generator."""
    if engine == "ours int8":
        torch.set_num_threads(threads)
        sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=SIDE_TEMPERATURE, top_k=SIDE_TOP_K, seed=0)
        start = time.perf_counter()
        for _ in decode_tokens(int8, prompt_ids, SIDE_SEQUENCES, sampling, n_vocab, traced=True):
            pass
        return time.perf_counter() - start
    batch = [[strings[i] for i in prompt_ids]] * SIDE_SEQUENCES  # three prompts, not num_hypotheses=3 (CTranslate2 issue 1579)
    start = time.perf_counter()
    results = generators[(engine, threads)].generate_batch(
        batch, max_length=new_tokens, min_length=new_tokens, sampling_topk=SIDE_TOP_K, sampling_temperature=SIDE_TEMPERATURE,
        include_prompt_in_result=False, end_token=[])
    seconds = time.perf_counter() - start
    if any(len(r.sequences_ids[0]) != new_tokens for r in results):
        raise RuntimeError(f"{engine} returned {[len(r.sequences_ids[0]) for r in results]} tokens, not {new_tokens} each.")
    return seconds


def run_side_by_side(args: argparse.Namespace, models: dict[str, torch.nn.Module], tokenizer, source: str) -> dict:
    """Ours int8 beside CTranslate2 int8 and fp32 at each thread count, on both workloads; with args.busy also under load."""
    try:
        import ctranslate2
    except ImportError:
        raise ValueError("ctranslate2 is not installed: pip install -r requirements-dev.txt.") from None
    ctranslate2.set_random_seed(0)
    int8, block = models["int8"], models["int8"].config.block_size
    prompt_ids = tokenizer.encode(PROMPT)
    fits = {w: len(prompt_ids) + n <= block for w, n in SIDE_BY_SIDE.items()}
    cells = [(w, e, t) for w in SIDE_BY_SIDE for e in ENGINES for t in args.thread_counts if e == "ours int8" or fits[w]]
    loads = ("quiet", "busy") if args.busy else ("quiet",)
    times: dict[tuple, list[float]] = {(c, load): [] for c in cells for load in loads}
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        generators, strings = ctranslate2_generators(models["fp32"], tokenizer, Path(tmp), args.thread_counts)
    warm_up(int8, SIDE_SEQUENCES)  # its step and its window slide
    time_cell = lambda w, e, t: time_side_cell(e, t, SIDE_BY_SIDE[w], int8, prompt_ids, tokenizer.n_vocab, generators, strings)
    for cell in cells:  # warm-up: first calls allocate and pick kernels
        time_cell(*cell)
    with competing_load(len(os.sched_getaffinity(0)) if args.busy else 0) as busy, \
            tqdm(total=len(times) * args.repeats, desc="side-by-side bench", unit="cell") as bar:
        for _ in range(args.repeats):
            for cell in cells:
                for load in loads:
                    if load == "busy":
                        busy.set()
                        time.sleep(0.2)  # the competing processes are spinning
                    times[(cell, load)].append(time_cell(*cell))
                    busy.clear()
                    bar.update()
    torch.set_num_threads(threads_before)
    rows = []
    for w, n in SIDE_BY_SIDE.items():
        for e in ENGINES:
            for t in args.thread_counts:
                for load in loads:
                    secs = times.get(((w, e, t), load))
                    tps = SIDE_SEQUENCES * n / statistics.median(secs) if secs else None
                    rows.append({"workload": w, "new_tokens": n, "engine": e, "threads": t, "load": load, "tokens_per_s": tps,
                                 "all_seconds": secs, "note": None if secs else f"n/a: context {block}"})
    steps = SIDE_BY_SIDE["56 tokens"]
    ct2_step = lambda: time_side_cell("CTranslate2 int8", 1, steps, int8, prompt_ids, tokenizer.n_vocab, generators, strings) / steps
    ours_step = lambda: time_side_cell("ours int8", 1, steps, int8, prompt_ids, tokenizer.n_vocab, generators, strings) / steps
    whole = {"ours, a whole step of the 56-token request": ours_step}
    if ("CTranslate2 int8", 1) in generators:
        whole["CTranslate2 int8, a whole step"] = ct2_step
    parts = step_parts_ms(int8, len(prompt_ids) + steps // 2, whole)
    return {"source": source, "block_size": block, "prompt": PROMPT, "prompt_tokens": len(prompt_ids), "sequences": SIDE_SEQUENCES,
            "step_parts_ms": parts,
            "top_k": SIDE_TOP_K, "temperature": SIDE_TEMPERATURE, "repeats": args.repeats, "threads": args.thread_counts,
            "ctranslate2": ctranslate2.__version__, "busy_processes": len(os.sched_getaffinity(0)) if args.busy else 0, "rows": rows}


@torch.inference_mode()
def step_parts_ms(int8: GPT, logits_of: int, whole: dict[str, Callable[[], float]], repeats: int = 300) -> dict[str, float]:
    """Milliseconds of one SIDE_SEQUENCES-row decode step of ours at 1 thread, by part (median of 5 rounds after a
    warm-up round, all alternating): the traced step's forward, its int8 Linear kernels alone, its attention alone
    (SDPA over the cache at the shape the step runs it), and sampling top-k from its logits; the forward's remainder
    is every other operator. whole: name -> seconds a step of a whole request, timed in the same rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n, cfg = SIDE_SEQUENCES, int8.config
    warm_up(int8, n)
    forward = forward_for(int8, n, 1, "shared", traced=True)
    idx, pos = torch.zeros(n, 1, dtype=torch.long), torch.tensor([logits_of])
    hd = cfg.n_embd // cfg.n_head
    q, kv = torch.randn(n, cfg.n_head, 1, hd), torch.randn(n, cfg.n_head, cfg.block_size, hd)
    mask = int8.causal_mask[pos][None, None]
    logits = forward(idx, pos).clone()
    sample = Sampler(SamplingConfig(temperature=SIDE_TEMPERATURE, top_k=SIDE_TOP_K, seed=0), n, logits.shape[-1], [0])

    def attention() -> None:
        for _ in range(cfg.n_layer):
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=mask)

    parts = {"forward": lambda: forward(idx, pos), "attention": attention, "sampling": lambda: sample(logits)}
    rounds: dict[str, list[float]] = {k: [] for k in (*parts, *whole)}
    for r in range(6):
        for name, run in parts.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            if r:
                rounds[name].append((time.perf_counter() - start) / repeats * 1e3)
        for name, step_seconds in whole.items():
            seconds = step_seconds()
            if r:
                rounds[name].append(seconds * 1e3)
    out = {k: statistics.median(v) for k, v in rounds.items()}
    out["int8 kernels"] = int8_linear_ms(int8, n)[0]
    out["other operators"] = out["forward"] - out["int8 kernels"] - out["attention"]
    torch.set_num_threads(threads)
    return out


def _side_row(result: dict, workload: str, engine: str, threads: int, load: str) -> dict:
    return next(r for r in result["rows"] if (r["workload"], r["engine"], r["threads"], r["load"]) == (workload, engine, threads, load))


def side_table(result: dict, load: str) -> str:
    """A Markdown table of one load's tokens/s: a row per workload and engine, a column per thread count."""
    threads = result["threads"]
    lines = ["| workload | engine | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads) + " |",
             "|---|---|" + "---:|" * len(threads)]
    for w in SIDE_BY_SIDE:
        for e in ENGINES:
            cells = [_side_row(result, w, e, t, load) for t in threads]
            lines.append(f"| {w} | {e} | " + " | ".join(r["note"] or f"{r['tokens_per_s']:.1f}" for r in cells) + " |")
    return "\n".join(lines)


def contention_table(result: dict) -> str:
    """Busy tok/s / quiet tok/s of every cell, at the same thread count."""
    threads = result["threads"]
    lines = ["| workload | engine | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads) + " |",
             "|---|---|" + "---:|" * len(threads)]
    for w in SIDE_BY_SIDE:
        for e in ENGINES:
            pairs = [(_side_row(result, w, e, t, "busy"), _side_row(result, w, e, t, "quiet")) for t in threads]
            ratios = [b["note"] or f"{b['tokens_per_s'] / q['tokens_per_s']:.2f}" for b, q in pairs]
            lines.append(f"| {w} | {e} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def ratio_line(result: dict, load: str) -> str:
    """Ours / CTranslate2 int8, each at its best thread count, per workload."""
    parts = []
    for w in SIDE_BY_SIDE:
        best = {e: max((_side_row(result, w, e, t, load) for t in result["threads"]), key=lambda r: r["tokens_per_s"] or 0)
                for e in ENGINES[:2]}
        ours, ct2 = best["ours int8"], best["CTranslate2 int8"]
        if ct2["tokens_per_s"] is None:
            parts.append(f"{w}: {ct2['note']}")
        else:
            parts.append(f"{w}: {ours['tokens_per_s'] / ct2['tokens_per_s']:.2f}x (ours {ours['tokens_per_s']:.1f} tok/s with "
                         f"{ours['threads']} thread(s), CTranslate2 int8 {ct2['tokens_per_s']:.1f} with {ct2['threads']})")
    return f"ours / CTranslate2 int8 at each one's best thread count ({load}): " + "; ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--ckpt", default="out", help="fp32 checkpoint directory (default: out)")
    src.add_argument("--random", metavar="SHAPE", help="benchmark a random-weight model with GPT-2's vocabulary instead of a "
                     "checkpoint: a preset name, or LAYERSxWIDTHxCONTEXT such as 6x384x256")
    ap.add_argument("--int8-ckpt", help="int8 checkpoint directory (default: CKPT/int8, else quantize the fp32 model here)")
    ap.add_argument("--only", choices=("grid", "ctranslate2"), help="run one part (default: both)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of every cell; the median is reported (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="grid: new tokens per sequence (default 200)")
    ap.add_argument("--num-samples", type=int, nargs="+", default=[1, 3], help="grid: return sequences per request (default: 1 3)")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[8, 512], help="grid: prompt lengths in tokens (default: 8 512)")
    ap.add_argument("--threads", type=int, help="grid: torch CPU threads (default: torch's choice)")
    ap.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2], help="ctranslate2: the columns' threads (default: 1 2)")
    ap.add_argument("--busy", action="store_true", help="ctranslate2: also run every cell while competing processes keep every "
                    "core busy, and report busy / quiet tokens/s")
    ap.add_argument("--out", default=str(RESULTS / "generation.json"),
                    help="grid JSON path (a PNG is written beside it, and the ctranslate2 part's JSON as NAME_ctranslate2.json)")
    args = ap.parse_args()
    if (args.repeats < 1 or args.max_new_tokens < 1 or min(args.num_samples) < 1 or min(args.prompt_tokens) < 1
            or min(args.thread_counts) < 1):
        print("error: --repeats, --max-new-tokens, --num-samples, --prompt-tokens and --thread-counts must be positive.", file=sys.stderr)
        return 2
    out = Path(args.out)
    side_out = out.with_name(out.stem + "_ctranslate2.json")
    try:
        models, tokenizer, source = models_to_bench(args)
        grid = run_grid(args, models, tokenizer, source) if args.only != "ctranslate2" else None
        side = run_side_by_side(args, models, tokenizer, source) if args.only != "grid" else None
    except (CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if grid:
        atomic.write_text(out, json.dumps(grid, indent=2) + "\n")
        plot(grid, out.with_suffix(".png"))
        print(f"{grid['source']}; context {grid['block_size']}, {args.max_new_tokens} new tokens per sequence, "
              f"top-k 50, median of {args.repeats}, {grid['torch_threads']} torch threads")
        print(table(grid))
        print(anatomy(grid))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    if side:
        atomic.write_text(side_out, json.dumps(side, indent=2) + "\n")
        print(f"\n{side['source']}; CTranslate2 {side['ctranslate2']}; prompt {side['prompt']!r} ({side['prompt_tokens']} tokens), "
              f"{side['sequences']} sequences, top-k {side['top_k']}, temperature {side['temperature']}, context {side['block_size']}; "
              f"tokens/s, median of {args.repeats}")
        for load in ("quiet", "busy") if args.busy else ("quiet",):
            if args.busy:
                print(f"\n{load}" + (f": {side['busy_processes']} competing processes of matmuls, one per core" if load == "busy" else ""))
            print(side_table(side, load))
            print(ratio_line(side, load))
        print(f"\none {side['sequences']}-row step at 1 thread, by part, in alternating rounds (ms): "
              + ", ".join(f"{k} {v:.3f}" for k, v in side["step_parts_ms"].items()))
        if args.busy:
            print("\ncontention: busy tok/s / quiet tok/s at the same thread count")
            print(contention_table(side))
        print(f"wrote {side_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
