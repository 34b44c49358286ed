"""The served model: copies of one checkpoint that requests borrow one at a time, and the card that describes it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from model.config import GPTConfig
from model.formats.checkpoint import CKPT_ENV, CheckpointError, read_json
from model.formats.load import load
from model.generation.batching import Batcher
from model.generation.engine import BUCKETS
from model.generation.generate import SamplingConfig
from model.gpt import GPT
from model.webapp.limits import DEFAULT_SEQUENCES, MAX_SEQUENCES
from model.webapp.training_job import DEFAULT_THREADS

# The CPU split, in one place (a 2-vCPU Space): CONCURRENCY batchers, each on its own model copy with cpus // CONCURRENCY
# torch threads (cpus.set_threads), decode every running request: a request joins the least busy one, whose steps then
# carry its rows together with the others' (model.batching), up to ROWS_PER_COPY rows; Gradio runs up to
# REQUESTS_AT_ONCE requests at once, the rest wait in its queue. A visitor's own trained model gets OWN_MODEL_COPIES
# copies; the Train tab's training (and then quantizing) subprocess, one at a time per server, gets TRAIN_THREADS threads.
CONCURRENCY = 2
ROWS_PER_COPY = BUCKETS[-1]  # 48: 16 default requests of 3 sequences on each copy
REQUESTS_AT_ONCE = CONCURRENCY * ROWS_PER_COPY // DEFAULT_SEQUENCES
OWN_MODEL_COPIES = 1
TRAIN_THREADS = DEFAULT_THREADS  # 1: measured with bench/app_training.py (docs/app.md)


class ModelPool:
    """Copies of one checkpoint, each decoding its share of the requests together (a Batcher per copy). A seeded
    request is decoded alone on its copy (seeded_alone, the default), so that its text is the same whoever else is
    served: int8 rows decoded together share one activation scale. seeded_alone=False batches it like any other
    (bench/app_latency.py --seeded-batched measures what decoding them alone costs)."""

    def __init__(self, ckpt: str | Path, copies: int = CONCURRENCY, seeded_alone: bool = True):
        ckpt = Path(ckpt)
        if not ckpt.exists():
            raise CheckpointError(f"No checkpoint at {ckpt}: run python train.py then python quantize.py "
                                  f"(or pass --ckpt DIR, or set {CKPT_ENV}).")
        self.ckpt = ckpt
        self.size = max(1, copies)
        self.seeded_alone = seeded_alone
        loaded = [load(ckpt, device="cpu") for _ in range(self.size)]
        self.first = loaded[0]  # its tokenizer and config serve request checks and the model card
        self.batchers = [Batcher(copy.model, max_rows=ROWS_PER_COPY) for copy in loaded]

    def warm_up(self) -> None:
        """Before the first visitor: on every copy, make and optimize the traced steps a request may need (each
        bucket of rows, a lone request of every size, and its window slide), about 2.5 s a copy on 2 vCPUs."""
        for batcher in self.batchers:
            batcher.warm_up(MAX_SEQUENCES)

    @property
    def requests_running(self) -> int:
        """Requests decoding now, on all copies."""
        return sum(b.requests_running for b in self.batchers)

    def decode(self, prompt_ids: list[int], num_samples: int, sampling: SamplingConfig,
               seeded: bool = False) -> Iterator[torch.Tensor]:
        """A request's tokens, step by step (as generate.decode_tokens yields them), from the least busy copy; a
        seeded request (the caller chose the seed) decoded alone there, if seeded_alone. prompt_ids: tokenized and
        cropped to the context (checks.check_request)."""
        batcher = min(self.batchers, key=lambda b: b.rows_in_use)
        return batcher.decode(prompt_ids, num_samples, sampling, self.first.tokenizer.n_vocab,
                              alone=seeded and self.seeded_alone)


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
