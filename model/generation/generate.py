"""Generation for one caller: a lone request decoded by the engine (the one-request case of engine.Engine), its
tokens turned into text (UTF-8 safe, stop strings cut), and the public entry points: stream(), generate(),
decode_tokens(), warm_up(). The CLI, the trainer's samples, the quantize report and the benchmarks use these; the app
runs the same engine through batching.Batcher. One model generates one request at a time: its caches and traces are
kept for its next request.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch

from model.generation.engine import Engine
from model.generation.sampling import (  # noqa: F401  (re-exported: the settings of a request and how one is picked)
    DEFAULT_SAMPLING,
    GREEDY_BELOW,
    SETTINGS,
    SamplingConfig,
    apply_penalties,
    draw,
    nucleus,
    sample_next,
    with_setting,
)
from model.gpt import GPT
from model.tokenizer import Tokenizer

# torch threads for generating on a CPU (generate.py; the app gives each copy cpus // copies): a small model's decode
# step is many tiny operators, which a second OpenMP thread slows down. Default model, 2 vCPUs (docs/generate.md):
# 1 thread 3,197 tok/s quiet and 1,220 beside two busy processes; 2 threads 1,022 and 576.
GENERATION_THREADS = 1


def warm_up(model: torch.nn.Module, num_samples: int) -> None:
    """Make the traced forwards of a lone request of num_samples rows (its step and its window slide) and run each
    twice (TorchScript optimizes over its first calls): a timing before its clock starts. Requests of that size then
    run traced. Caches the model already has for more rows are kept."""
    if isinstance(model, GPT):
        with torch.inference_mode():
            Engine(model, num_samples).warm_up(num_samples)


@torch.inference_mode()
def decode_tokens(model: torch.nn.Module, prompt_ids: list[int], num_samples: int, sampling: SamplingConfig,
                  n_vocab: int, keep: int | None = None, traced: bool | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of each of num_samples sequences (a (num_samples,) tensor) per step: the engine with this
    one request. prompt_ids: tokenized and cropped to the context (prompt_tokens). keep: tokens a full window keeps
    when it slides (default half the context); traced: force the traced or the eager forward (tests, benchmarks)."""
    engine = Engine(model, num_samples)
    request = engine.request(prompt_ids, num_samples, sampling, n_vocab, keep, traced)
    steps = int(sampling.max_new_tokens)
    if steps == 0:
        return
    was_training = model.training
    model.eval()
    try:
        engine.reserve()
        engine.admit(request)
        yield request.last
        for _ in range(steps - 1):
            engine.step()
            yield request.last
    finally:
        model.train(was_training)


@torch.inference_mode()
def naive_tokens(model: torch.nn.Module, prompt_ids: list[int], sampling: SamplingConfig, n_vocab: int,
                 generator: torch.Generator, last_only: bool = False) -> list[int]:
    """The reference loop (how the original Space generated): one sequence, the whole window (cropped to the
    context) recomputed by the plain forward every step, no cache; last_only skips the logits of earlier positions
    (nanoGPT's one trick). Slow by design: the benchmark's baseline and the tests' ground truth. No penalties."""
    block = model.config.block_size
    n_vocab = min(n_vocab, model.config.vocab_size)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=next(iter(model.parameters())).device)
    for _ in range(int(sampling.max_new_tokens)):
        logits = model(idx[:, -block:], last_only=last_only)[0][:, -1, :n_vocab]
        idx = torch.cat([idx, sample_next(logits, sampling, generator).view(1, 1)], dim=1)
    return idx[0, len(prompt_ids):].tolist()


class _TextRow:
    """One sequence's text: bytes become text only once a UTF-8 character is complete (bytes that cannot make one
    are dropped, never shown as U+FFFD); stop strings are cut. Text that could be the beginning of a stop string is
    held back until it is known not to be one."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # keeps an incomplete tail pending
        self.pending = ""
        self.done = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show."""
        if self.done:
            return ""
        if token == self.tokenizer.eot_token:
            self.done = True
            return self.flush()
        self.pending += self.utf8.decode(self.tokenizer.decode_bytes([token]))
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.done = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = max((n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text at the end (an incomplete trailing UTF-8 character is dropped, never shown as garbage)."""
        out, self.pending = self.pending, ""
        return out


def prompt_tokens(tokenizer: Tokenizer, prompt: str, block_size: int | None = None) -> list[int]:
    """Token ids of the prompt, the last block_size of them when given (what the model can see); an empty prompt
    starts from <|endoftext|>, as a document boundary. Where a text prompt enters (stream, generate, the CLI)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_token is None:
            raise ValueError("The prompt is empty and this tokenizer has no <|endoftext|> to start from; give some text.")
        ids = [tokenizer.eot_token]
    return ids[-block_size:] if block_size else ids


def texts(tokenizer: Tokenizer, steps: Iterator[torch.Tensor], num_samples: int, sampling: SamplingConfig) -> Iterator[list[str]]:
    """Yields, after each decode step of steps (a request's tokens, from decode_tokens or a server's batcher), a list
    of num_samples strings: the NEW text of each sequence since the previous yield ('' if none). Stops early once every
    sequence hit <|endoftext|> or a stop string, and then closes steps (which ends the request)."""
    rows = [_TextRow(tokenizer, tuple(sampling.stop)) for _ in range(num_samples)]
    last_step = sampling.max_new_tokens - 1
    try:
        for step, nxt in enumerate(steps):
            new = []
            for row, tok in zip(rows, nxt.tolist(), strict=True):
                text = row.push(tok)
                if step == last_step and not row.done:
                    text += row.flush()
                new.append(text)
            yield new
            if all(row.done for row in rows):
                break
    finally:
        steps.close()  # ends the engine's generator at once (it restores train mode), also when the consumer stops early


def stream(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, num_samples: int = 1,
           sampling: SamplingConfig = DEFAULT_SAMPLING) -> Iterator[list[str]]:
    """The new text of each of num_samples sequences after each decode step (texts()), continuing prompt on model."""
    ids = prompt_tokens(tokenizer, prompt, model.config.block_size)
    yield from texts(tokenizer, decode_tokens(model, ids, num_samples, sampling, tokenizer.n_vocab), num_samples, sampling)


def generate(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, num_samples: int = 1,
             sampling: SamplingConfig = DEFAULT_SAMPLING) -> list[str]:
    """The full continuations (without the prompt), one per sample, decoded as stream() decodes them."""
    out = [""] * num_samples
    for new in stream(model, tokenizer, prompt, num_samples, sampling):
        out = [a + b for a, b in zip(out, new, strict=True)]
    return out
