"""Generation: KV cache against full recompute, sampling filters, seeds, sliding, stop rules, UTF-8 streaming, CLI."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn as nn
from model_support import tiny_gpt

import generate as cli
from model.config import GPTConfig
from model.formats.checkpoint import save_config, save_weights
from model.generation.cache import filling, reserve
from model.generation.generate import (
    SamplingConfig,
    apply_penalties,
    decode_tokens,
    generate,
    naive_tokens,
    nucleus,
    sample_next,
    stream,
    with_setting,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(steps: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=steps, temperature=0.0, top_k=None)


def engine_tokens(model, prompt, num_samples, sampling, n_vocab=101, keep=None) -> list[list[int]]:
    """All tokens decode_tokens produced, one list per sequence."""
    steps = [t.tolist() for t in decode_tokens(model, prompt, num_samples, sampling, n_vocab, keep=keep)]
    return [list(col) for col in zip(*steps, strict=True)]


class ScriptedModel(nn.Module):
    """Stands in for a GPT with the engine's interface: step i's logits put row r's script[r][i] on top."""

    def __init__(self, script: list[list[int]], vocab: int = 50304, block: int = 64):
        super().__init__()
        self.config = GPTConfig(block_size=block, vocab_size=vocab, n_layer=1, n_head=1, n_embd=8)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.script, self.step, self.prefills = script, 0, []

    def setup_caches(self, batch_size: int, max_len: int | None = None, cache: type | None = None) -> None:
        self.step = 0

    def clear_caches(self) -> None:
        pass

    def forward(self, idx, input_pos=None, last_only=False, need_weights=False):
        if idx.shape[1] > 1 or self.step == 0:
            self.prefills.append(idx.tolist())
        logits = torch.zeros(len(self.script), 1, self.config.vocab_size)
        for r, row in enumerate(self.script):
            logits[r, 0, row[min(self.step, len(row) - 1)]] = 10.0
        self.step += 1
        return logits, None


# --- the engine against full recomputation ---

def test_cached_logits_equal_uncached():
    model = tiny_gpt()
    x = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(0))
    x[:, :12] = x[0, :12]  # a shared prompt, then each row's own tokens
    with torch.inference_mode():
        full, _ = model(x)
        reserve(model, 3)
        with filling(model, torch.arange(3)):  # the prompt prefilled once, for all rows
            first, _ = model(x[:1, :12], input_pos=torch.arange(12))
        steps = [model(x[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(12, 20)]
        model.clear_caches()
    torch.testing.assert_close(first[0], full[0, :12], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 12:], atol=1e-5, rtol=1e-4)


def test_greedy_equals_naive_greedy_within_context():
    model, prompt = tiny_gpt(), [5, 17, 3, 99, 42]
    ours = engine_tokens(model, prompt, 2, greedy(25))
    naive = naive_tokens(model, prompt, greedy(25), 101, torch.Generator())
    assert ours == [naive, naive]


def test_sliding_with_full_window_equals_naive_past_the_context():
    """keep = the whole context re-prefills every step past it: exactly the naive loop, which crops each step."""
    model, prompt = tiny_gpt(), list(range(40, 80))  # 40 tokens > context 32
    ours = engine_tokens(model, prompt[-32:], 1, greedy(30), keep=32)  # cropped as prompt_tokens crops
    assert ours == [naive_tokens(model, prompt, greedy(30), 101, torch.Generator())]


def test_sliding_default_window_recomputes_the_kept_tokens():
    """Default: when the cache is full, keep the last half of the context; check against an uncached reference."""
    model, prompt, block, keep = tiny_gpt(), [1, 2, 3, 4, 5, 6], 32, 16
    ours = engine_tokens(model, prompt, 1, greedy(70))[0]
    seq, start = list(prompt), 0
    with torch.inference_mode():
        for _ in range(70):
            if len(seq) - start > block:
                start = len(seq) - keep
            logits, _ = model(torch.tensor([seq[start:]]))
            seq.append(int(logits[0, -1].argmax()))
    assert ours == seq[len(prompt):]
    assert start > 0  # the window did slide


def test_int8_model_generates():
    from model.formats.int8 import quantize_model

    model = tiny_gpt(vocab=128)
    qmodel = quantize_model(model)
    ours = engine_tokens(qmodel, [3, 4, 5], 3, SamplingConfig(max_new_tokens=40, seed=0), n_vocab=128)
    assert len(ours) == 3 and all(len(r) == 40 and all(0 <= t < 128 for t in r) for r in ours)
    first_naive = naive_tokens(qmodel, [3, 4, 5], greedy(1), 128, torch.Generator())
    assert engine_tokens(qmodel, [3, 4, 5], 1, greedy(1), n_vocab=128) == [first_naive]


# --- sampling ---

def test_top_k_never_samples_outside_the_top_k():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0)).expand(4000, -1)
    top5 = set(logits[0].topk(5).indices.tolist())
    got = sample_next(logits, SamplingConfig(top_k=5, temperature=1.5), torch.Generator().manual_seed(1))
    assert set(got.tolist()) == top5  # only the top 5, and each of them at some point


def test_top_p_keeps_the_smallest_set_reaching_p():
    sorted_logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: int(torch.isfinite(nucleus(sorted_logits, p)).sum())
    assert [kept(0.4), kept(0.5), kept(0.8), kept(0.81), kept(0.96)] == [1, 1, 2, 3, 4]
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log().expand(3000, -1)
    got = sample_next(logits, SamplingConfig(top_k=None, top_p=0.8), torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {1, 3}


def test_a_vanishing_temperature_is_greedy():
    """logits / 1e-40 would overflow to inf and give NaN probabilities; below GREEDY_BELOW the choice is the argmax."""
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    for t in (1e-40, 1e-6):
        got = sample_next(logits, SamplingConfig(temperature=t, top_k=50), torch.Generator().manual_seed(0))
        assert torch.equal(got, logits.argmax(dim=-1))


def test_penalties():
    logits, counts = torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[1.0, 2.0, 0.0]])
    assert apply_penalties(logits, counts, SamplingConfig(repetition_penalty=2.0)).tolist() == [[1.0, -4.0, 1.0]]
    assert apply_penalties(logits, counts, SamplingConfig(frequency_penalty=0.5)).tolist() == [[1.5, -3.0, 1.0]]
    # Greedy with a strong repetition penalty never repeats a token of the prompt or of its own output.
    out = engine_tokens(tiny_gpt(), [1, 2], 1, SamplingConfig(max_new_tokens=20, temperature=0, repetition_penalty=1e9))[0]
    assert len(set(out + [1, 2])) == 22


def test_same_seed_same_text_independent_of_global_rng():
    model = tiny_gpt()
    cfg = SamplingConfig(max_new_tokens=30, top_k=None, seed=123)
    torch.manual_seed(1)
    a = engine_tokens(model, [1, 2, 3], 3, cfg)
    state = torch.get_rng_state()
    torch.manual_seed(999)
    b = engine_tokens(model, [1, 2, 3], 3, cfg)
    assert a == b
    assert len({tuple(r) for r in a}) == 3  # the three sequences differ from one another
    assert engine_tokens(model, [1, 2, 3], 3, SamplingConfig(max_new_tokens=30, top_k=None, seed=124)) != a
    torch.manual_seed(1)
    engine_tokens(model, [1, 2, 3], 3, cfg)
    assert torch.equal(torch.get_rng_state(), state)  # generation leaves the global RNG alone


def test_settings_validation_and_parsing():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0).validate()
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1).validate()
    s = with_setting(with_setting(SamplingConfig(), "top_k", "off"), "stop", "\\n\\n")
    assert (s.top_k, s.stop) == (None, ("\n\n",))
    with pytest.raises(ValueError, match="Unknown setting"):
        with_setting(s, "warmth", "1")
    with pytest.raises(ValueError, match="not a valid value"):
        with_setting(s, "temperature", "hot")


# --- text: stop rules and UTF-8 streaming (real GPT-2 vocabulary) ---

def test_stops_at_endoftext_and_stop_strings(gpt2_tokenizer):
    tok = gpt2_tokenizer
    eot, ids = tok.eot_token, tok.encode("Hello world\n\nMore text here")
    model = ScriptedModel([ids[:2] + [eot] + ids[2:], ids, tok.encode(" a b c")])
    pieces = list(stream(model, tok, "Hi", 3, SamplingConfig(max_new_tokens=20, stop=("d\n\nMo",), temperature=0)))
    texts = ["".join(p[r] for p in pieces) for r in range(3)]
    assert texts == ["Hello world", "Hello worl", " a b" + " c" * 18]  # row 3 ran to max_new_tokens
    assert len(pieces) == 20
    assert all("d" not in p[1] for p in pieces)  # the stop string's start was held back, never shown


def test_stream_stops_early_when_every_sequence_is_done(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = ScriptedModel([tok.encode(" x") + [tok.eot_token]] * 2)
    pieces = list(stream(model, tok, "Hi", 2, SamplingConfig(max_new_tokens=50, temperature=0)))
    assert len(pieces) == 2 and generate(model, tok, "Hi", 2, SamplingConfig(max_new_tokens=50, temperature=0)) == [" x", " x"]


def test_utf8_streaming_never_shows_a_split_character(gpt2_tokenizer):
    tok = gpt2_tokenizer
    byte_tokens = [tok.enc.encode_single_token(bytes([b])) for b in "🙂".encode()]  # the emoji split into 4 tokens
    script = [tok.encode(" ok ") + byte_tokens + tok.encode(" é") + byte_tokens[:2]]  # ends halfway through a character
    pieces = [p[0] for p in stream(ScriptedModel(script), tok, "Hi", 1, SamplingConfig(max_new_tokens=len(script[0]), temperature=0))]
    assert all("\ufffd" not in p for p in pieces)
    assert "🙂" in pieces  # shown whole, in one piece, once its last byte arrived
    assert "".join(pieces) == " ok 🙂 é"  # the incomplete trailing character is dropped, not shown as garbage


def test_empty_prompt_starts_from_endoftext(gpt2_tokenizer):
    model = ScriptedModel([gpt2_tokenizer.encode(" x")])
    assert generate(model, gpt2_tokenizer, "", 1, SamplingConfig(max_new_tokens=1, temperature=0)) == [" x"]
    assert model.prefills[0] == [[gpt2_tokenizer.eot_token]]


# --- the CLI ---

@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, gpt2_tokenizer):
    path = tmp_path_factory.mktemp("ckpt")
    save_weights(path / "model.safetensors", tiny_gpt(vocab=50304))
    save_config(path, tiny_gpt(vocab=50304).config, gpt2_tokenizer.spec)
    return path


def test_cli_streams_each_sample_with_a_header(ckpt_dir, capsys):
    args = ["--ckpt", str(ckpt_dir), "--prompt", "Hello", "--num-samples", "2", "--max-new-tokens", "5", "--seed", "3"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("\nHello") == 2
    assert cli.main(args) == 0 and capsys.readouterr().out == out  # same seed, same text


def test_cli_errors_are_one_sentence(tmp_path, ckpt_dir, capsys):
    assert cli.main(["--ckpt", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert cli.main(["--ckpt", str(ckpt_dir), "--prompt", "x", "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "Traceback" not in err


def test_cli_interactive_session(ckpt_dir, capsys, monkeypatch):
    lines = "/set temperature 0\n/set top_k nope\n/settings\nHello\n/reset\n/settings\n/bogus\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert cli.main(["--ckpt", str(ckpt_dir), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "temperature = 0.0" in out and "temperature = 0.8" in out  # set, then reset
    assert "not a valid value for top_k" in out and "unknown command /bogus" in out and "Hello" in out


def test_generate_drops_bytes_that_make_no_character(gpt2_tokenizer):
    """An undertrained model can write a UTF-8 lead byte followed by plain text (the trainer's sample once read
    "unkorge\ufffdind"): generate(), as stream(), shows no U+FFFD for it; a valid character still comes through."""
    tok = gpt2_tokenizer
    lead = tok.enc.encode_single_token(bytes([0xE2]))  # starts a 3-byte character that never completes
    script = [tok.encode(" unkorge") + [lead] + tok.encode("ind é")]
    out = generate(ScriptedModel(script), tok, "Hi", 1, SamplingConfig(max_new_tokens=len(script[0]), temperature=0))
    assert out == [" unkorgeind é"]


def test_a_request_has_one_set_of_defaults():
    """The CLI, the app and the API take their defaults from SamplingConfig: one temperature, defined once."""
    from model.webapp import limits

    defaults = SamplingConfig()
    assert (limits.DEFAULT_TEMPERATURE, limits.DEFAULT_TOP_K, limits.DEFAULT_TOP_P, limits.DEFAULT_MAX_NEW_TOKENS) == (
        defaults.temperature, defaults.top_k, defaults.top_p, defaults.max_new_tokens)
    args = cli.parse_args([])
    assert (args.temperature, args.top_k, args.top_p, args.max_new_tokens) == (
        defaults.temperature, defaults.top_k, defaults.top_p, defaults.max_new_tokens)
    assert defaults.temperature == 0.8  # the app's


def test_cli_help_shows_max_new_tokens_and_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS new tokens per sample" in help_text and "(default 200)" in help_text


def test_cli_ends_with_a_speed_line_on_stderr(ckpt_dir, capsys):
    assert cli.main(["--ckpt", str(ckpt_dir), "--prompt", "Hello", "--num-samples", "2", "--max-new-tokens", "5",
                     "--seed", "3"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"10 tokens in \d+\.\d\d s: \d+\.\d tokens/s", err[0]), err


def test_cli_set_confirms_and_lists_every_setting(ckpt_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("/set foo 1\n/set temperature 0.5\n/set num_samples 2\n/set num_samples 0\n"))
    assert cli.main(["--ckpt", str(ckpt_dir), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "unknown setting 'foo'; choose one of: num_samples, max_new_tokens, temperature" in out
    assert "  temperature = 0.5\n" in out and "  num_samples = 2\n" in out  # each change confirmed
    assert "num_samples must be at least 1" in out


def test_a_generate_tab_prompt_is_tokenized_once(ckpt_dir, monkeypatch):
    """The app's edge (check_request) tokenizes and crops the prompt; the engine decodes those ids (no second pass)."""
    from model.webapp.checks import check_request
    from model.webapp.pool import ModelPool
    from model.webapp.streaming import stream_sequences

    pool = ModelPool(ckpt_dir, copies=1)
    tok, calls = pool.first.tokenizer, []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: calls.append(text) or real(text))
    prompt, n, sampling, _ = check_request("Hello there", 5, 2, 0.8, 50, 1.0, 1, pool)
    *_, last = stream_sequences(pool, prompt, n, sampling)
    assert calls == ["Hello there"] and sum(map(bool, last)) == 2
