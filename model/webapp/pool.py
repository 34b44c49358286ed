"""The served model: copies of one checkpoint that requests borrow one at a time, and the card that describes it."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CKPT_ENV, CheckpointError, read_json
from ..config import GPTConfig
from ..generate import slide_keep
from ..gpt import GPT
from ..load import Loaded, load
from ..trace import cached_forward
from ..training_job import DEFAULT_THREADS
from .checks import DEFAULT_SEQUENCES, MAX_SEQUENCES

# The CPU split, in one place (a 2-vCPU Space): CONCURRENCY requests generate at once, each on its own model copy with
# cpus // CONCURRENCY torch threads (cpus.set_threads); a visitor's own trained model gets OWN_MODEL_COPIES copies; the
# Train tab's training (and then quantizing) subprocess, one at a time per server, gets TRAIN_THREADS threads.
CONCURRENCY = 2
OWN_MODEL_COPIES = 1
TRAIN_THREADS = DEFAULT_THREADS  # 1: measured with bench/app_training.py (docs/app.md)


class ModelPool:
    """CONCURRENCY copies of one checkpoint; each request borrows one, so no two share a KV cache."""

    def __init__(self, ckpt: str | Path, copies: int = CONCURRENCY):
        ckpt = Path(ckpt)
        if not ckpt.exists():
            raise CheckpointError(f"No checkpoint at {ckpt}: run python train.py then python quantize.py "
                                  f"(or pass --ckpt DIR, or set {CKPT_ENV}).")
        self.ckpt = ckpt
        self.size = max(1, copies)
        loaded = [load(ckpt, device="cpu") for _ in range(self.size)]
        self.first = loaded[0]  # its tokenizer and config serve request checks and the model card
        self.copies: queue.Queue[Loaded] = queue.Queue()
        for copy in loaded:
            self.copies.put(copy)

    def warm_up(self) -> None:
        """Before the first visitor: on every copy, make and optimize the traced one-token step for every number of
        sequences a request may ask for, and the window slide of the default request (about 1 s a copy here)."""
        block = self.first.config.block_size
        shapes = [(n, 1) for n in range(1, MAX_SEQUENCES + 1)] + [(DEFAULT_SEQUENCES, slide_keep(block))]
        for _ in range(self.size):
            with self.borrow() as loaded, torch.inference_mode():
                loaded.model.setup_caches(MAX_SEQUENCES)  # caches for the largest request: no request reallocates them
                for n, t in shapes:
                    forward = cached_forward(loaded.model, n, t)
                    for _ in range(2):  # TorchScript optimizes a trace over its first two calls
                        forward(torch.zeros(n, t, dtype=torch.long), torch.arange(t))

    @contextmanager
    def borrow(self) -> Iterator[Loaded]:
        """One model copy for the duration of a request (waits if all are busy)."""
        loaded = self.copies.get()
        try:
            yield loaded
        finally:
            self.copies.put(loaded)


def model_card(pool: ModelPool) -> str:
    """Markdown facts about the served model: parameters, size, validation loss, tokenizer."""
    loaded = pool.first
    report = _optional_json(pool.ckpt / "report.json") or _optional_json(pool.ckpt / "metrics.json")
    params = report.get("params") or _param_count(loaded.config)
    size = report.get("size_int8_bytes") or sum(f.stat().st_size for f in pool.ckpt.glob("*.safetensors"))
    val = report.get("val_nats_per_char_int8") or report.get("val_nats_per_char")
    cfg = loaded.config
    rows = [
        f"**Parameters** {params / 1e6:.2f} M ({cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd})",
        f"**Weights** {loaded.kind}, {size / 1e6:.1f} MB",
        f"**Validation loss** {val:.3f} nats/char" if isinstance(val, int | float) else "**Validation loss** not recorded",
        f"**Tokenizer** {loaded.tokenizer.name} ({loaded.tokenizer.n_vocab} tokens), context {cfg.block_size} tokens",
    ]
    return " · ".join(rows)


def _param_count(config: GPTConfig) -> int:
    """Parameters of a GPT of this shape (tied head once), counted on the meta device without allocating."""
    with torch.device("meta"):
        return GPT(config).num_params(non_embedding=False)


def _optional_json(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except CheckpointError:  # missing or damaged: the card falls back to what it can work out
        return {}
