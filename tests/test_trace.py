"""The engine's fast path (model.generation.trace): same logits and tokens as the eager forward, reuse across requests, caches kept,
the traces held by the engine (not the model) and chosen by it alone."""

from __future__ import annotations

import copy
import gc
import weakref

import model_support
import pytest
import torch

from model.generation.cache import reserve
from model.generation.generate import SamplingConfig, decode_tokens, draw, warm_up
from model.generation.trace import forward_for, traces
from model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt() -> GPT:
    return model_support.tiny_gpt(vocab=128)


def int8_gpt() -> GPT:
    from model.formats.int8 import quantize_model

    return quantize_model(tiny_gpt())


def rotary_gpt() -> GPT:
    """The default cpu preset's block: rotary positions."""
    return model_support.tiny_gpt(vocab=128, rotary=True)


def int8_rotary_relu2_gpt() -> GPT:
    from model.formats.int8 import quantize_model

    return quantize_model(model_support.tiny_gpt(vocab=128, rotary=True, mlp="relu2"))


def tokens(model: GPT, num_samples: int, sampling: SamplingConfig, traced: bool | None, prompt=(3, 4, 5, 6)) -> list[list[int]]:
    """The engine's tokens per sequence with the traced step, the eager one, or (None) the one the engine picks."""
    steps = [t.tolist() for t in decode_tokens(model, list(prompt), num_samples, sampling, 128, traced=traced)]
    return [list(col) for col in zip(*steps, strict=True)]


@pytest.mark.parametrize("make", [tiny_gpt, int8_gpt, rotary_gpt, int8_rotary_relu2_gpt],
                         ids=["fp32", "int8", "rotary", "int8-rotary-relu2"])
def test_traced_logits_equal_eager_logits_step_by_step(make):
    """Two copies of one model: every one-token step and a window slide give the same logits traced and eager."""
    eager_model = make()
    traced_model = copy.deepcopy(eager_model)
    x = torch.randint(0, 128, (3, 48), generator=torch.Generator().manual_seed(0))
    x[:, :6] = x[0, :6]  # a shared prompt
    with torch.inference_mode():
        outs = {}
        for name, model in (("eager", eager_model), ("traced", traced_model)):
            reserve(model, 3)
            rows = torch.arange(3)
            prefill = forward_for(model, 1, 6, "fill", traced=False)(x[:1, :6], rows)
            step = forward_for(model, 3, 1, "shared", traced=name == "traced")
            logits = [step(x[:, t:t + 1], torch.tensor([t])) for t in range(6, 32)]
            slide = forward_for(model, 3, 16, "fill", traced=name == "traced")
            logits.append(slide(x[:, 24:40], rows))  # the window slid: 16 kept tokens at positions 0..15
            logits += [step(x[:, t:t + 1], torch.tensor([t - 24])) for t in range(40, 48)]  # positions 16..23
            outs[name] = torch.stack([prefill.expand(3, -1)] + logits)
    assert torch.equal(outs["traced"], outs["eager"])  # the same operators: bit for bit, so a seed gives one text
    assert not torch.equal(outs["traced"][1], outs["traced"][2])  # the steps really differ from one another


@pytest.mark.parametrize("make", [tiny_gpt, int8_gpt], ids=["fp32", "int8"])
def test_traced_engine_gives_the_eager_engines_tokens(make):
    """Seeded sampling past the context (so the window slides) and greedy decoding: the same tokens either way."""
    model = make()
    for sampling in (SamplingConfig(max_new_tokens=70, top_k=20, seed=3), SamplingConfig(max_new_tokens=70, temperature=0)):
        assert tokens(model, 3, sampling, traced=True) == tokens(model, 3, sampling, traced=False)


def test_traces_are_made_once_per_shape_and_reused_across_requests():
    model, sampling = tiny_gpt(), SamplingConfig(max_new_tokens=40, top_k=20, seed=1)
    fresh = {n: tokens(tiny_gpt(), n, sampling, traced=False) for n in (1, 3)}
    assert tokens(model, 3, sampling, traced=True) == fresh[3]
    made = dict(traces(model))
    assert sorted(k[:2] for k in made) == [(3, 1), (3, 16)]  # the one-token step and the slide of half the context
    assert tokens(model, 1, sampling, traced=True) == fresh[1]  # fewer rows: the same caches, a trace of its own
    assert tokens(model, 3, sampling, traced=True) == fresh[3]
    assert all(traces(model)[k] is t for k, t in made.items())  # not traced again
    reserve(model, 5)  # more rows than the caches hold: new caches, and the traces bound to the old ones go
    assert traces(model) == {}
    assert tokens(model, 3, sampling, traced=True) == fresh[3]


def test_tracing_leaves_the_caches_as_they_were():
    """Tracing runs the forward once on example input; the caches it wrote are put back."""
    model = tiny_gpt()
    with torch.inference_mode():
        reserve(model, 2)
        forward_for(model, 1, 4, "fill", traced=False)(torch.tensor([[5, 6, 7, 8]]), torch.arange(2))
        before = [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in model.transformer.h]
        forward_for(model, 2, 3, "shared", traced=True)
        forward_for(model, 2, 16, "fill", traced=True)
        after = [(b.attn.kv_cache.k, b.attn.kv_cache.v) for b in model.transformer.h]
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(before, after, strict=True) for a, b in zip(pair_a, pair_b, strict=True))
    assert before[0][0].abs().sum() > 0


def test_draw_follows_the_probabilities():
    """The exponential race picks index i with probability p_i (and never one with p_i = 0)."""
    probs = torch.tensor([[0.5, 0.3, 0.0, 0.2]]).expand(40_000, -1)
    got = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(got, minlength=4).float() / got.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.0, 0.2]), atol=0.01, rtol=0)
    assert int((got == 2).sum()) == 0


def test_the_engine_traces_once_it_pays_and_then_keeps_tracing(monkeypatch):
    """No step given: a lone short request runs eagerly; once the model's eager steps (this request's included) reach
    TRACE_MIN_TOKENS, or a trace of the shape exists, the request runs traced. Text is the same either way."""
    import model.generation.trace as trace

    calls = []
    real = trace._trace
    monkeypatch.setattr(trace, "_trace", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(trace, "TRACE_MIN_TOKENS", 30)
    model, other = tiny_gpt(), tiny_gpt()
    expected = tokens(other, 2, SamplingConfig(max_new_tokens=12, seed=0), traced=False)
    assert tokens(model, 2, SamplingConfig(max_new_tokens=12, seed=0), traced=None) == expected
    assert calls == [] and traces(model) == {}  # short and never traced: eager
    tokens(model, 1, SamplingConfig(max_new_tokens=12, seed=0), traced=None)
    assert calls == [] and traces(model) == {}  # 24 eager steps so far
    assert tokens(model, 2, SamplingConfig(max_new_tokens=12, seed=0), traced=None) == expected
    assert calls == [1] and {k[:2] for k in traces(model)} == {(2, 1)}  # 36 >= 30: tracing has paid, so traced
    tokens(model, 1, SamplingConfig(max_new_tokens=2, seed=0), traced=None)
    assert {k[:2] for k in traces(model)} == {(2, 1), (1, 1)}  # and from then on, every shape
    assert tokens(other, 2, SamplingConfig(max_new_tokens=30, seed=0), traced=None)  # one long request: traced at once
    assert {k[:2] for k in traces(other)} == {(2, 1), (2, 16)}  # 4 + 30 tokens: a slide too


def test_warm_up_makes_the_shapes_a_server_serves():
    """warm_up traces a request size's step and slide (over caches kept for more rows); the engine then uses them even
    for a short request."""
    model = tiny_gpt()
    reserve(model, 4)
    for n in (1, 2, 3):
        warm_up(model, n)
    assert {k[:2] for k in traces(model)} == {(1, 1), (2, 1), (3, 1), (1, 16), (2, 16), (3, 16)}
    made = dict(traces(model))
    sampling = SamplingConfig(max_new_tokens=40, seed=0)  # past the context: the slide too
    assert tokens(model, 3, sampling, traced=None) == tokens(tiny_gpt(), 3, sampling, traced=False)
    assert traces(model) == made and model.transformer.h[0].attn.kv_cache.k.shape[0] == 4  # nothing new


def test_a_dropped_model_takes_its_traces_with_it():
    """The engine holds traces by the model weakly: the traces do not keep a model (and its caches) alive."""
    model = tiny_gpt()
    tokens(model, 2, SamplingConfig(max_new_tokens=5, seed=0), traced=True)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_copies_start_without_traces():
    """A deep copy (as quantize_dynamic makes) does not carry traces, which would hold a private copy of the weights."""
    from model.formats.int8 import quantize_model

    model = tiny_gpt()
    sampling = SamplingConfig(max_new_tokens=40, seed=0)
    tokens(model, 2, sampling, traced=True)
    assert traces(model)
    for copy_ in (copy.deepcopy(model), quantize_model(model)):
        assert traces(copy_) == {}
        assert tokens(copy_, 2, sampling, traced=True) == tokens(copy_, 2, sampling, traced=False)
    assert traces(model)  # the original keeps its own


def test_draw_makes_torch_multinomials_draw():
    """Same generator state, same indices as torch.multinomial(probs, 1): seeds keep giving the texts they gave."""
    probs = torch.softmax(3 * torch.randn(8, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    for seed in range(5):
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        assert torch.equal(draw(probs, torch.Generator().manual_seed(seed)), expected)


def test_after_generating_the_model_still_works_outside_inference_mode():
    """The caches kept from a generation are ordinary tensors: a cached forward under no_grad can write them."""
    model = tiny_gpt()
    tokens(model, 2, SamplingConfig(max_new_tokens=5, seed=0), traced=True)
    with torch.no_grad():
        reserve(model, 2)
        out, _ = model(torch.tensor([[1, 2, 3]]), input_pos=torch.arange(3))
    assert out.shape == (1, 3, 128)


def test_a_moved_or_reloaded_model_gets_new_traces():
    """.to() and load_state_dict(assign=True) give the model new tensors: the traces of the old ones are not used."""
    model, sampling = tiny_gpt(), SamplingConfig(max_new_tokens=40, top_k=20, seed=2)
    tokens(model, 2, sampling, traced=True)
    old = list(traces(model).values())  # held, so their ids stay theirs
    model.double()  # weights, caches and mask move together
    assert model.causal_mask.dtype == torch.float64
    assert tokens(model, 2, sampling, traced=True) == tokens(model, 2, sampling, traced=False)
    assert traces(model) and not {id(t) for t in old} & {id(t) for t in traces(model).values()}  # made anew; the old ones are gone
    other = model_support.tiny_gpt(vocab=128, seed=1).double()
    model.load_state_dict(other.state_dict(), assign=True)
    expected = tokens(other, 2, sampling, traced=False)
    assert tokens(model, 2, sampling, traced=True) == expected
    assert expected != tokens(tiny_gpt().double(), 2, sampling, traced=False)  # the new weights do change the text
