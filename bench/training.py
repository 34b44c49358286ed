"""Benchmark: what a CPU user gets for the minutes they wait.

    python bench/training.py --throughput        tokens/s and chars/s of the presets, fp32 and bf16 (alternating, median)
    python bench/training.py --minutes 10        a run of the default `python train.py` for that budget: val nats/char + curve
    python bench/training.py --lever ...         one lever run of a minimal loop, budget in CPU seconds (--clock cpu), so
                                                 configurations can be ranked fairly on a shared machine
    python bench/training.py --vs-nanogpt --nanogpt-dir PATH [--compile]
                                                 our training tokens/s beside nanoGPT's model.py (imported from PATH, a
                                                 checkout of github.com/karpathy/nanoGPT) at the default shape and batch,
                                                 each stepped as its own train.py does on a CPU (alternating, median)
Not a test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import GPTConfig  # noqa: E402
from model.formats.checkpoint import LOG, METRICS, CheckpointError, read_json, read_log  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.plot import save_figure  # noqa: E402
from model.tokenizer import Tokenizer, TokenizerError, padded_vocab_size  # noqa: E402
from model.training.data import DataError, TokenData, get_batch, prepare, training_tokenizer  # noqa: E402
from model.training.evaluate import evaluate  # noqa: E402
from model.training.optim import clip_grads, lr_at, make_optimizer, set_lr, warmup_frac  # noqa: E402
from model.training.plan import resolve  # noqa: E402
from model.training.settings import ArgError, TrainSettings  # noqa: E402
from model.training.trainer import Trainer, train  # noqa: E402

BASELINE = 1.539  # nanoGPT's CPU recipe run for 16,000 iters (10.9 min here), val nats/char


def autocast_for(dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU, or nothing for fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def load_data(text_path: str, tokenizer_name: str, cache_root: Path) -> tuple[Tokenizer, TokenData]:
    """A tokenizer built for the training split (gpt2-compact with the trainer's default min count) and both splits
    tokenised (cached per tokenizer)."""
    tok = training_tokenizer(tokenizer_name, text_path, TrainSettings.vocab_min_count)
    return tok, prepare(text_path, cache_root / tokenizer_name, tok)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, data: TokenData, batch_size: int, block_size: int,
               gen: torch.Generator, dtype: str, grad_clip: float = 1.0) -> float:
    """One AdamW step on a random batch; returns the loss."""
    x, y = get_batch(data.train, batch_size, block_size, gen)
    with autocast_for(dtype):
        _, loss = model(x, y)
    loss.backward()
    clip_grads(model, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_rate(model: GPT, data: TokenData, batch_size: int, dtype: str, steps: int) -> float:
    """Training steps per second (forward, backward, clipping, AdamW) after two warm-up steps."""
    gen = torch.Generator().manual_seed(0)
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.99))
    for _ in range(2):
        train_step(model, opt, data, batch_size, model.config.block_size, gen, dtype)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, data, batch_size, model.config.block_size, gen, dtype)
    return steps / (time.perf_counter() - t0)


def throughput_table(args: argparse.Namespace) -> None:
    """Tokens/s and chars/s of each preset and tokenizer in fp32 and bf16, alternating, median of repeats."""
    rows = []
    for tok_name in args.tokenizers.split(","):
        tok, data = load_data(args.data, tok_name, Path(args.cache))
        chars_per_token = data.train_chars / len(data.train)
        for name in args.presets.split(","):
            cfg = GPTConfig.from_name(name)
            cfg.vocab_size, cfg.dropout = padded_vocab_size(tok.n_vocab), 0.0
            rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
            for _ in range(args.repeats):
                for dtype in rates:
                    torch.manual_seed(0)
                    rates[dtype].append(step_rate(GPT(cfg), data, args.batch_size, dtype, args.steps))
            for dtype, r in rates.items():
                tps = statistics.median(r) * args.batch_size * cfg.block_size
                rows.append((name, tok_name, dtype, tps, tps * chars_per_token))
                print(f"{name:6s} {tok_name:13s} {dtype}  {tps:9.0f} tokens/s  {tps * chars_per_token:9.0f} chars/s", flush=True)
    print(f"\nbatch {args.batch_size} x the preset's context, {args.threads} threads, median of {args.repeats}")
    print("| preset | tokenizer | dtype | tokens/s | chars/s |\n|---|---|---|---:|---:|")
    for name, tok_name, dtype, tps, cps in rows:
        print(f"| {name} | {tok_name} | {dtype} | {tps:,.0f} | {cps:,.0f} |")


@dataclass
class Engine:
    """One side of the nanoGPT comparison: a training step as its own trainer takes it, and what it measured."""

    name: str
    step: Callable[[], None]  # one optimizer update on a fresh batch
    describe: str
    params: int
    first_step_s: float = 0.0  # the first step alone (torch.compile's start-up with --compile)
    rates: list[float] = field(default_factory=list)  # tokens/s of each repeat


def load_nanogpt(path: str | None) -> ModuleType:
    """nanoGPT's model.py imported by file path from a checkout (nothing of it is copied here); ArgError if unusable."""
    model_py = Path(path) / "model.py" if path else None
    if model_py is None or not model_py.is_file():
        where = f"{path} has no model.py" if path else "--nanogpt-dir is missing"
        raise ArgError(f"{where}; pass --nanogpt-dir PATH, a checkout of https://github.com/karpathy/nanoGPT "
                       "(git clone https://github.com/karpathy/nanoGPT PATH).")
    spec = importlib.util.spec_from_file_location("nanogpt_model", model_py)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:  # noqa: BLE001 - any failure of foreign code becomes one message
        raise ArgError(f"{model_py} could not be imported ({type(e).__name__}: {e}); pass a nanoGPT checkout.") from None
    if not (hasattr(module, "GPT") and hasattr(module, "GPTConfig")):
        raise ArgError(f"{model_py} defines no GPT and GPTConfig; pass a checkout of https://github.com/karpathy/nanoGPT.")
    return module


def ours_engine(trainer: Trainer, name: str = "ours") -> Engine:
    """Our side: the trainer's own optimizer step (autocast, micro-batches, clipping, the default optimizer) on a
    trainer built as `python train.py` builds it."""
    cfg, a = trainer.config, trainer.settings
    variants = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("rotary", "mlp", "qk_norm"))
    opt = type(trainer.optimizer).__name__
    desc = (f"model.gpt.GPT ({variants}, dropout {cfg.dropout:g}, bias {cfg.bias}){', torch.compile' if a.compile else ''}; "
            f"{str(trainer.dtype).removeprefix('torch.')}; Trainer.train_step with {a.optimizer} ({opt}); clip {a.grad_clip:g}")
    return Engine(name, trainer.train_step, desc, trainer.raw_model.num_params())


def nanogpt_engine(module: ModuleType, cfg: GPTConfig, a: TrainSettings, data: TokenData, block: int) -> Engine:
    """nanoGPT's classic GPT (learned positions, GELU, dropout 0, bias) stepped as its train.py does on a CPU: fp32
    (nullcontext), configure_optimizers (non-fused AdamW off CUDA), clip_grad_norm_, zero_grad(set_to_none=True)."""
    ncfg = module.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                            n_embd=cfg.n_embd, dropout=0.0, bias=True)
    torch.manual_seed(a.seed)
    with contextlib.redirect_stdout(io.StringIO()):  # its parameter counts and optimizer groups
        model = module.GPT(ncfg)
        opt = model.configure_optimizers(a.weight_decay, a.lr, (a.beta1, a.beta2), "cpu")
    gen = torch.Generator().manual_seed(a.seed)
    accum = a.grad_accum

    def step() -> None:
        for _ in range(accum):
            x, y = get_batch(data.train, a.batch_size, block, gen)
            with contextlib.nullcontext():  # train.py: ctx = nullcontext() if device_type == 'cpu'
                _, loss = model(x, y)
                loss = loss / accum
            loss.backward()
        if a.grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    fused = "fused" if opt.defaults.get("fused") else "non-fused"
    desc = (f"nanoGPT model.py GPT (learned positions, GELU, dropout 0, bias True); fp32; "
            f"configure_optimizers ({type(opt).__name__}, {fused}); clip_grad_norm_ {a.grad_clip:g}")
    return Engine("nanoGPT", step, desc, sum(p.numel() for p in model.parameters()))


def vs_nanogpt(args: argparse.Namespace) -> None:
    """Our training tokens/s beside nanoGPT's model.py at the default shape and batch: both built once, warmed up, then
    timed alternately (ours, nanoGPT, ours, ...), median of the repeats."""
    module = load_nanogpt(args.nanogpt_dir)
    # Every setting at what `python train.py` uses; nothing written but the token cache.
    given = {"data": args.data, "out_dir": str(Path(args.cache) / "vs-nanogpt"), "compile": args.compile or None,
             "threads": args.threads}
    plan = resolve(given)
    trainer = Trainer(plan)
    a, cfg, data, block = trainer.settings, trainer.config, trainer.data, trainer.settings.block_size
    # The same model with nanoGPT's optimizer too, so the engine's speed and the optimizer's cost are told apart.
    adamw = Trainer(resolve({**given, "optimizer": "adamw"})) if a.optimizer != "adamw" else None
    engines = [ours_engine(trainer), *([ours_engine(adamw, "ours-adamw")] if adamw else []),
               nanogpt_engine(module, cfg, a, data, block)]
    tokens_per_step = a.batch_size * block * a.grad_accum
    print(f"shape: preset {a.preset}, {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.n_embd} wide, context {block}, vocab "
          f"{cfg.vocab_size} ({a.tokenizer}); batch {a.batch_size} x {a.grad_accum} accum; {args.threads} threads")
    for e in engines:
        print(f"  {e.name:8s} {e.params / 1e6:.2f}M params: {e.describe}")
    for e in engines:
        t0 = time.perf_counter()
        e.step()
        e.first_step_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            e.step()
    for r in range(args.repeats):
        for e in engines:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                e.step()
            e.rates.append(args.steps * tokens_per_step / (time.perf_counter() - t0))
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{e.name} {e.rates[-1]:,.0f} tok/s" for e in engines), flush=True)
    tps = {e.name: statistics.median(e.rates) for e in engines}
    print(f"\nmedian of {args.repeats} x {args.steps} steps after {args.warmup} warm-up steps, alternating, {args.threads} threads")
    print("| engine | tokens/s | ratio to nanoGPT | first step s |\n|---|---:|---:|---:|")
    for e in engines:
        print(f"| {e.name} | {tps[e.name]:,.0f} | {tps[e.name] / tps['nanoGPT']:.2f}x | {e.first_step_s:.2f} |")
    if args.compile:
        print(f"ours' first step includes torch.compile: {engines[0].first_step_s:.1f} s of the 10-minute budget")
    print(f"ours {tps['ours']:,.0f} tok/s vs nanoGPT {tps['nanoGPT']:,.0f} tok/s: {tps['ours'] / tps['nanoGPT']:.2f}x")


def lever_run(args: argparse.Namespace, t_start: float) -> dict:
    """Train a configuration for args.minutes (CPU or wall clock), then score the whole validation split."""
    tok, data = load_data(args.data, args.tokenizer, Path(args.cache))
    cfg = GPTConfig(block_size=args.block_size, vocab_size=padded_vocab_size(tok.n_vocab), n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=not args.no_bias)
    data.check(cfg.block_size)
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    opt = make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t_train = clock()
    end = t_train + args.minutes * 60 if args.clock == "cpu" else t_start + args.minutes * 60 - args.reserve
    step, t_wall = 0, time.perf_counter()
    while (now := clock()) < end:
        set_lr(opt, lr_at(warmup_frac(step, args.warmup_iters), (now - t_train) / (end - t_train), args.lr, args.lr * args.min_lr_ratio))
        loss = train_step(model, opt, data, args.batch_size, cfg.block_size, gen, args.dtype)
        step += 1
        if step % 100 == 0:
            print(f"  step {step}  loss {loss:.3f}  {(clock() - t_train) / 60:.2f} min", flush=True)
    train_wall = time.perf_counter() - t_wall
    res = evaluate(model, data.val, data.val_chars, cfg.block_size, batch_size=32, autocast=autocast_for(args.dtype))
    tokens = step * args.batch_size * cfg.block_size
    return {"val_nats_per_char": res["val_nats_per_char"], "val_nats_per_token": res["val_nats_per_token"], "steps": step,
            "epochs": tokens / len(data.train), "tokens_per_wall_s": tokens / train_wall, "params": model.num_params(),
            "wall_s": time.perf_counter() - t_start}


def default_run(args: argparse.Namespace) -> dict:
    """`python train.py --data DATA --max-minutes M` with every other setting at its default; curve from its log."""
    out = Path(args.out_dir)
    t0 = time.perf_counter()
    metrics = train({"data": args.data, "out_dir": str(out), "max_minutes": args.minutes, "threads": args.threads}).metrics
    return run_curve(out, metrics, time.perf_counter() - t0)


def run_curve(out: Path, metrics: dict, wall: float) -> dict:
    """Val nats/char against wall minutes of a finished run: its periodic evaluations, then the final whole-split figure."""
    records = read_log(out / LOG)
    curve = [(r["elapsed"] / 60, r["val_nats_per_char"]) for r in records
             if "val_nats_per_char" in r and not r.get("final") and not r.get("estimate")]
    curve.append((wall / 60, metrics["val_nats_per_char"]))
    return {"val_nats_per_char": metrics["val_nats_per_char"], "steps": metrics["step"], "wall_s": wall, "curve": curve}


def plot_curve(curve: list[tuple[float, float]], label: str, path: Path) -> None:
    """val nats/char against wall minutes, with the nanoGPT CPU baseline, as a small PNG."""
    import matplotlib.pyplot as plt  # the Agg backend: model.plot (imported with model.trainer) selects it
    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    ax.plot([c[0] for c in curve[:-1]], [c[1] for c in curve[:-1]], ".-", label=f"{label} (periodic evaluations)")
    ax.plot([curve[-1][0]], [curve[-1][1]], "o", color="C3", label=f"final, whole split: {curve[-1][1]:.3f}")
    ax.axhline(BASELINE, color="gray", ls="--", lw=1, label=f"nanoGPT CPU recipe, 16k iters, 10.9 min ({BASELINE})")
    ax.set(xlabel="wall minutes (startup and evaluations included)", ylabel="val nats/char", ylim=(1.3, 3.0))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=80)


def main() -> int:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="input.txt")
    p.add_argument("--cache", default="bench/results/cache", help="token caches of the throughput, lever and vs-nanoGPT runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--minutes", type=float, default=10.0, help="budget of the default or lever run")
    p.add_argument("--out-dir", default="bench/results/default", help="checkpoint of the default run")
    p.add_argument("--plot", default="bench/results/curve.png", help="curve PNG of the default run")
    p.add_argument("--curve-of", metavar="OUT", help="only plot the curve of a finished run (e.g. out, after python train.py)")
    g = p.add_argument_group("throughput")
    g.add_argument("--throughput", action="store_true", help="print the throughput table instead of training")
    g.add_argument("--presets", default="cpu,tiny")
    g.add_argument("--tokenizers", default="bytes,gpt2-compact,gpt2")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--steps", type=int, help="timed steps per repeat (default: 5 with --throughput, 20 with --vs-nanogpt)")
    g.add_argument("--repeats", type=int, help="repeats, median taken (default: 3 with --throughput, 5 with --vs-nanogpt)")
    g = p.add_argument_group("vs nanoGPT (--steps, --repeats and --threads as above)")
    g.add_argument("--vs-nanogpt", action="store_true", help="our training tokens/s beside nanoGPT's model.py")
    g.add_argument("--nanogpt-dir", metavar="PATH", help="a checkout of https://github.com/karpathy/nanoGPT (its model.py is imported)")
    g.add_argument("--compile", action="store_true", help="torch.compile our model (its first step is reported apart)")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps of each engine before the repeats")
    g = p.add_argument_group("lever run")
    g.add_argument("--lever", action="store_true", help="train one configuration with the minimal loop")
    g.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="budget clock: cpu (training CPU seconds only: fair on a shared machine with --threads 1) or wall")
    g.add_argument("--reserve", type=float, default=20.0, help="wall seconds kept for the final eval (--clock wall)")
    g.add_argument("--tokenizer", default="bytes")
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=6)
    g.add_argument("--n-embd", type=int, default=384)
    g.add_argument("--block-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-iters", type=int, default=50)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    g.add_argument("--no-bias", action="store_true")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--label", default="")
    g.add_argument("--results", default="bench/results/levers.jsonl", help="lever results are appended here as JSON lines")
    args = p.parse_args()
    args.steps = (20 if args.vs_nanogpt else 5) if args.steps is None else args.steps
    args.repeats = (5 if args.vs_nanogpt else 3) if args.repeats is None else args.repeats
    if min(args.steps, args.repeats, args.warmup) < 1:
        p.error("--steps, --repeats and --warmup must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        if args.curve_of:
            metrics = read_json(Path(args.curve_of) / METRICS)
            res = run_curve(Path(args.curve_of), metrics, metrics["total_seconds"])
            plot_curve(res["curve"], f"python train.py ({args.curve_of})", Path(args.plot))
            print(f"curve of {args.curve_of}: val {res['val_nats_per_char']:.4f} nats/char; written to {args.plot}")
        elif args.throughput:
            throughput_table(args)
        elif args.vs_nanogpt:
            vs_nanogpt(args)
        elif args.lever:
            res = {"label": args.label, **lever_run(args, t_start), "args": vars(args)}
            print(json.dumps({k: v for k, v in res.items() if k != "args"}))
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(res) + "\n")
        else:
            res = default_run(args)
            plot_curve(res["curve"], f"python train.py --max-minutes {args.minutes:g} --threads {args.threads}", Path(args.plot))
            print(f"default run: val {res['val_nats_per_char']:.4f} nats/char after {res['steps']} steps, "
                  f"{res['wall_s'] / 60:.2f} min wall; curve in {args.plot}")
    except (ArgError, DataError, TokenizerError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
