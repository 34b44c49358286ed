"""Training tokens/s of one preset in fp32 and bf16 autocast, alternating rounds, median of rounds.

    python bench/train_dtype.py [--preset cpu] [--batch-size 32] [--rounds 3] [--steps 2] [--threads N]
Measures the trainer's own step (model.trainer.Trainer.train_step's pieces) on random tokens: speed only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import preset  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.optim import clip_grads, make_optimizer  # noqa: E402


def step_seconds(model: GPT, opt: torch.optim.Optimizer, x: torch.Tensor, dtype: torch.dtype) -> float:
    """Seconds of one optimizer step (forward, backward, clip, AdamW) under the given autocast dtype."""
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with ctx:
        _, loss = model(x, x)
    loss.backward()
    clip_grads(model, 1.0)
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per dtype per round (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = preset(a.preset)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.99))
    x = torch.randint(0, cfg.vocab_size, (a.batch_size, cfg.block_size))
    tokens = a.batch_size * cfg.block_size
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"{a.preset}: {model.num_params() / 1e6:.1f}M params, {tokens} tokens/step, {torch.get_num_threads()} threads")
    for name in dtypes:
        step_seconds(model, opt, x, dtypes[name])  # warm-up
    for r in range(a.rounds):
        for name, dtype in (dtypes.items() if r % 2 == 0 else reversed(dtypes.items())):
            secs = [step_seconds(model, opt, x, dtype) for _ in range(a.steps)]
            rates[name].append(tokens / statistics.median(secs))
            print(f"round {r}: {name} {rates[name][-1]:,.0f} tokens/s")
    f32, b16 = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
    print(f"median: fp32 {f32:,.0f} tokens/s, bf16 {b16:,.0f} tokens/s, bf16/fp32 = {b16 / f32:.2f}x")


if __name__ == "__main__":
    main()
