"""Requests decoded together (model.generation.batching, on engine.Engine): each gets what it would get alone, also across window slides."""

from __future__ import annotations

import threading

import pytest
import torch
from model_support import tiny_gpt

from model.formats.int8 import quantize_model
from model.generation.batching import Batcher
from model.generation.generate import SamplingConfig, decode_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 101


def alone(model, prompt: list[int], n: int, sampling: SamplingConfig) -> list[list[int]]:
    prompt = prompt[-model.config.block_size:]  # cropped where a prompt enters, as prompt_tokens and the app do
    return torch.stack(list(decode_tokens(model, prompt, n, sampling, VOCAB)), dim=1).tolist()


def together(batcher: Batcher, requests: list[tuple[list[int], int, SamplingConfig]],
             decoded_alone: list[bool] | None = None) -> list[list[list[int]]]:
    """Every request from its own thread, all at once; those marked in decoded_alone ask to be decoded alone."""
    decoded_alone = decoded_alone or [False] * len(requests)
    out: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i: int) -> None:
        prompt, n, sampling = requests[i]
        prompt = prompt[-batcher.model.config.block_size:]
        start.wait()
        out[i] = torch.stack(list(batcher.decode(prompt, n, sampling, VOCAB, alone=decoded_alone[i])), dim=1).tolist()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


@pytest.mark.parametrize("rotary", [True, False])
def test_concurrent_requests_get_what_each_gets_alone(rotary: bool) -> None:
    model = tiny_gpt(VOCAB, block=32, rotary=rotary)
    batcher = Batcher(tiny_gpt(VOCAB, block=32, rotary=rotary), max_rows=24)
    greedy = SamplingConfig(max_new_tokens=70, temperature=0)  # past the context: two window slides
    requests = [([1, 2, 3], 3, greedy), ([5] * 30, 1, greedy), ([7, 8], 2, SamplingConfig(max_new_tokens=5, temperature=0)),
                (list(range(40, 90)), 2, SamplingConfig(max_new_tokens=40, temperature=0.9, top_k=20, seed=3)),
                ([9, 9, 9, 9], 4, SamplingConfig(max_new_tokens=50, temperature=1.0, top_p=0.9, seed=7, repetition_penalty=1.3)),
                # the same settings, other seeds and lengths: sampled together, each from its own generator
                ([11, 12], 3, SamplingConfig(max_new_tokens=45, temperature=0.8, top_k=10, seed=11)),
                ([13], 2, SamplingConfig(max_new_tokens=60, temperature=0.8, top_k=10, seed=12))]
    got = together(batcher, requests)
    for (prompt, n, sampling), tokens in zip(requests, got, strict=True):
        assert tokens == alone(model, prompt, n, sampling)
    assert batcher.rows_in_use == 0


def test_more_rows_than_fit_wait_for_room() -> None:
    model = tiny_gpt(VOCAB)
    batcher = Batcher(tiny_gpt(VOCAB), max_rows=4)
    sampling = SamplingConfig(max_new_tokens=20, temperature=0)
    requests = [([i + 1, i + 2], 3, sampling) for i in range(4)]  # 12 rows asked, 4 fit at a time
    for (prompt, n, s), tokens in zip(requests, together(batcher, requests), strict=True):
        assert tokens == alone(model, prompt, n, s)


def test_a_request_closed_early_frees_its_rows() -> None:
    batcher = Batcher(tiny_gpt(VOCAB), max_rows=3)
    stream = batcher.decode([1, 2], 3, SamplingConfig(max_new_tokens=500, temperature=0), VOCAB)
    next(stream)
    stream.close()
    # The next request needs all 3 rows: it only finishes if the closed one gave them back.
    assert len(list(batcher.decode([3], 3, SamplingConfig(max_new_tokens=4, temperature=0), VOCAB))) == 4


def test_int8_rows_decode_together() -> None:
    """int8 quantizes a step's activations over all its rows, so texts may differ from alone; shapes and ranges hold."""
    batcher = Batcher(quantize_model(tiny_gpt(VOCAB)), max_rows=12)
    requests = [([i + 1] * (i + 1), 3, SamplingConfig(max_new_tokens=40, seed=i)) for i in range(4)]
    for (_, n, s), tokens in zip(requests, together(batcher, requests), strict=True):
        assert len(tokens) == n and all(len(row) == s.max_new_tokens and 0 <= min(row) and max(row) < VOCAB for row in tokens)


def test_int8_requests_decoded_alone_get_what_each_gets_alone() -> None:
    """Requests decoded alone (a server's seeded requests) get exactly their tokens alone, also with int8 weights,
    while other requests, decoded together, arrive at the same time; every request finishes."""
    model = quantize_model(tiny_gpt(VOCAB, block=32))
    batcher = Batcher(quantize_model(tiny_gpt(VOCAB, block=32)), max_rows=12)
    requests = [([i + 1] * (i + 1), 1 + i % 3, SamplingConfig(max_new_tokens=40, seed=i)) for i in range(8)]
    decoded_alone = [i % 2 == 0 for i in range(8)]
    got = together(batcher, requests, decoded_alone)
    for (prompt, n, sampling), tokens, by_itself in zip(requests, got, decoded_alone, strict=True):
        assert len(tokens) == n and all(len(row) == sampling.max_new_tokens for row in tokens)
        if by_itself:
            assert tokens == alone(model, prompt, n, sampling)
    assert batcher.rows_in_use == 0 and not batcher._alone


def test_bad_requests_are_refused_in_one_sentence() -> None:
    batcher = Batcher(tiny_gpt(VOCAB), max_rows=3)
    with pytest.raises(ValueError, match="no tokens"):
        next(batcher.decode([], 1, SamplingConfig(), VOCAB))
    with pytest.raises(ValueError, match="between 1 and 3"):
        next(batcher.decode([1], 4, SamplingConfig(), VOCAB))


def test_a_failing_step_ends_its_requests_with_the_error_and_the_next_ones_run(monkeypatch) -> None:
    batcher = Batcher(tiny_gpt(VOCAB), max_rows=6)
    real = batcher.engine._forward

    def broken(*args):
        raise RuntimeError("the step broke")

    monkeypatch.setattr(batcher.engine, "_forward", broken)
    with pytest.raises(RuntimeError, match="the step broke"):
        list(batcher.decode([1, 2], 3, SamplingConfig(max_new_tokens=5, temperature=0), VOCAB))
    monkeypatch.setattr(batcher.engine, "_forward", real)
    assert len(list(batcher.decode([1, 2], 3, SamplingConfig(max_new_tokens=5, temperature=0), VOCAB))) == 5
