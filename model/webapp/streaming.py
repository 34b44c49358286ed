"""Running the model for a request: the growing texts of a generation (prompt, then continuation), throttled for the
page, and the next-token table."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pandas as pd
import torch

from model.generation.generate import SamplingConfig, prompt_tokens, texts
from model.tokenizer import Tokenizer
from model.webapp.limits import MAX_SEQUENCES
from model.webapp.pool import ModelPool

# Streamed text reaches the page at most 20 times a second, smooth and cheap for Gradio; with N requests running, each
# request's updates come N times less often, so that Gradio's cost stays that of 20 updates a second in all.
UPDATE_INTERVAL_S = 0.05


def stream_sequences(pool: ModelPool, prompt_ids: list[int], num_sequences: int, sampling: SamplingConfig,
                     interval: float | None = None, seeded: bool = False) -> Iterator[list[str]]:
    """The full text of every sequence so far (always MAX_SEQUENCES strings): at once after the first decode step, then
    at most once per interval seconds (default UPDATE_INTERVAL_S times the requests running), and at the end. Every
    update costs Gradio a few ms, more than a decode step. Each text starts with the prompt as the model saw it, then
    what the model wrote, as generate.py prints a sample. prompt_ids: tokenized and cropped (checks.check_request);
    seeded: the caller chose the seed, so the text must not depend on other requests (ModelPool.decode)."""
    interval = UPDATE_INTERVAL_S if interval is None else interval
    sofar = [pool.first.tokenizer.decode(prompt_ids)] * num_sequences
    last, pending = -math.inf, False
    steps = pool.decode(prompt_ids, num_sequences, sampling, seeded=seeded)
    for new in texts(pool.first.tokenizer, steps, num_sequences, sampling):
        sofar = [t + piece for t, piece in zip(sofar, new, strict=True)]
        pending = True
        if time.monotonic() - last >= interval * max(1, pool.requests_running):
            yield sofar + [""] * (MAX_SEQUENCES - num_sequences)
            last, pending = time.monotonic(), False
    if pending:
        yield sofar + [""] * (MAX_SEQUENCES - num_sequences)


def next_token_table(pool: ModelPool, prompt: str, k: int = 10) -> pd.DataFrame:
    """The k most likely next tokens after prompt (temperature 1), as rows of (token, probability)."""
    loaded = pool.first
    with torch.inference_mode():  # a plain forward reads no KV cache, so it can run beside the copy's batcher
        tokenizer, block_size = loaded.tokenizer, loaded.config.block_size
        ids = prompt_tokens(tokenizer, prompt)[-block_size:]
        logits, _ = loaded.model(torch.tensor([ids]), last_only=True)
    return top_tokens(tokenizer, logits[0, -1], k)


def top_tokens(tokenizer: Tokenizer, logits: torch.Tensor, k: int = 10) -> pd.DataFrame:
    """The k most likely tokens of one position's logits (V,) at temperature 1, as rows of (token, probability)."""
    probs = torch.softmax(logits[:tokenizer.n_vocab].float(), dim=-1)
    top = torch.topk(probs, k)
    labels = [f"{rank}. {tokenizer.decode([int(i)])!r}" for rank, i in enumerate(top.indices.tolist(), 1)]
    return pd.DataFrame({"token": labels, "probability": top.values.tolist()})
