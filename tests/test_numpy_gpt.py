"""The NumPy forward pass (model/numpy_gpt.py): the torch model's logits within 1e-4 for every block variant and for a
GPT-2 in Hugging Face's format, greedy tokens equal to the engine's (also through generate.py --engine numpy), no torch
imported, and clear refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_support import tiny_gpt
from safetensors.numpy import load_file, save_file

import generate as cli
from model import numpy_gpt
from model.config import GPTConfig
from model.formats.checkpoint import CheckpointError, save_config, save_weights
from model.formats.load import load
from model.generation import sampling as torch_sampling
from model.generation.generate import SamplingConfig, decode_tokens, naive_tokens
from model.gpt import GPT
from model.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
BYTES = build_tokenizer("bytes", "")
# Every block the trainer can build: the presets (cpu: rotary GELU; tiny and gpt2: GPT-2's classic block) and the
# --rotary / --mlp / --qk-norm / bias switches, each on and off somewhere.
VARIANTS = {
    "classic (tiny, gpt2 presets)": dict(),
    "rotary gelu (cpu preset)": dict(rotary=True),
    "rotary relu2 qk-norm": dict(rotary=True, mlp="relu2", qk_norm=True),
    "learned relu2 no bias": dict(mlp="relu2", bias=False),
    "learned qk-norm": dict(qk_norm=True),
    "rotary no bias": dict(rotary=True, bias=False),
}


def random_gpt(seed: int = 0, vocab: int = 320, block: int = 24, **variant) -> GPT:
    """A tiny GPT with every parameter random (LayerNorm gains and biases too), so that any mix-up shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=2, n_head=4, n_embd=32, **variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def save_ckpt(model: GPT, path, tokenizer=BYTES):
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path / "model.safetensors", model)
    save_config(path, model.config, tokenizer.spec)
    return path


def prompts(vocab: int, block: int) -> list[list[int]]:
    """Several token sequences: one token, short ones, and a full context."""
    rng = np.random.default_rng(1)
    return [[7]] + [rng.integers(0, vocab, n).tolist() for n in (2, 5, 13, block)]


def max_logit_diff(torch_model, numpy_model, sequences) -> float:
    worst = 0.0
    for ids in sequences:
        with torch.no_grad():
            ours = torch_model(torch.tensor([ids]))[0][0].numpy()
        theirs = numpy_model(ids)
        assert theirs.shape == ours.shape and theirs.dtype == np.float32
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_logits_equal_the_torch_models(tmp_path, variant):
    model = random_gpt(**variant)
    numpy_model = numpy_gpt.load(save_ckpt(model, tmp_path / "ckpt"))
    assert numpy_model.config == model.config
    diff = max_logit_diff(model, numpy_model, prompts(model.config.vocab_size, model.config.block_size))
    print(f"max |logit diff| {diff:.3g}")
    assert diff < TOL


def test_too_long_a_window_is_refused(tmp_path):
    numpy_model = numpy_gpt.load(save_ckpt(random_gpt(), tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="1 to 24 tokens"):
        numpy_model(list(range(25)))


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A random-weight GPT-2 saved by transformers (model.safetensors, Conv1D weights) and that model."""
    transformers = pytest.importorskip("transformers", reason="transformers (test-only dependency) is not installed")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=48)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    (path / "pytorch_model.bin").unlink(missing_ok=True)
    return path, hf


def test_hugging_face_gpt2_logits_equal_ours_and_transformers(hf_gpt2, gpt2_tokenizer):
    path, hf = hf_gpt2
    numpy_model = numpy_gpt.load(path)
    torch_model = load(path).model
    assert numpy_model.config == torch_model.config and numpy_model.meta["tokenizer"] == {"name": "gpt2"}
    texts = ["ROMEO:", "To be, or not to be, that is the question:", "The quick brown fox jumps over the lazy dog."]
    sequences = [gpt2_tokenizer.encode(t) for t in texts]
    assert max_logit_diff(torch_model, numpy_model, sequences) < TOL
    with torch.no_grad():
        for ids in sequences:
            assert np.abs(hf(torch.tensor([ids])).logits[0].numpy() - numpy_model(ids)).max() < TOL


@pytest.mark.parametrize("variant", [dict(), dict(rotary=True, qk_norm=True)], ids=["classic", "rotary qk-norm"])
def test_greedy_tokens_equal_the_engines(tmp_path, variant):
    """Within the context; past it, the NumPy loop keeps the last block_size tokens, as the reference naive_tokens does
    (the engine's default slide keeps half of them)."""
    model = tiny_gpt(vocab=BYTES.n_vocab, block=32, **variant)
    numpy_model = numpy_gpt.load(save_ckpt(model, tmp_path / "ckpt"))
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    prompt = BYTES.encode("Hello there")
    engine = [int(t) for (t,) in decode_tokens(model, prompt, 1, greedy, BYTES.n_vocab)]
    mine = [int(t) for (t,) in numpy_gpt.decode_tokens(numpy_model, prompt, 1, greedy, BYTES.n_vocab)]
    assert mine == engine and len(set(mine)) > 1  # a greedy run that depends on its context, not one token forever
    longer = SamplingConfig(max_new_tokens=45, temperature=0.0)  # past the context of 32: the last 32 tokens, as naive_tokens
    naive = naive_tokens(model, prompt, longer, BYTES.n_vocab, torch.Generator())
    assert [int(t) for (t,) in numpy_gpt.decode_tokens(numpy_model, prompt, 1, longer, BYTES.n_vocab)] == naive


def test_generate_cli_with_numpy_engine_writes_the_engines_greedy_text(tmp_path, capsys, gpt2_tokenizer):
    model = tiny_gpt(vocab=50304, block=32, rotary=True)
    ckpt = save_ckpt(model, tmp_path / "ckpt", gpt2_tokenizer)
    args = ["--ckpt", str(ckpt), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"]
    assert cli.main(args) == 0
    engine_text = capsys.readouterr().out
    assert cli.main([*args, "--engine", "numpy"]) == 0
    numpy_text = capsys.readouterr().out
    assert numpy_text == engine_text and len(numpy_text) > len("ROMEO:\n")


def test_sampling_is_seeded_and_keeps_to_top_k(tmp_path):
    numpy_model = numpy_gpt.load(save_ckpt(random_gpt(vocab=BYTES.n_vocab), tmp_path / "ckpt"))
    prompt = BYTES.encode("abc")
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=3, seed=5)
    runs = [[t.tolist() for t in numpy_gpt.decode_tokens(numpy_model, prompt, 2, sampled, BYTES.n_vocab)] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 8 and all(len(step) == 2 for step in runs[0])
    logits = np.array([0.0, 5.0, 1.0, 4.0, 3.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert {numpy_gpt.sample(logits, 1.0, 3, 1.0, rng) for _ in range(200)} == {1, 3, 4}
    assert {numpy_gpt.sample(logits, 1.0, None, 0.5, rng) for _ in range(50)} == {1}  # 1 alone holds over half
    assert numpy_gpt.sample(logits, 1e-6, None, 1.0, rng) == 1


def test_greedy_threshold_is_the_engines():
    assert numpy_gpt.GREEDY_BELOW == torch_sampling.GREEDY_BELOW


def test_loading_and_running_import_no_torch(tmp_path):
    ckpt = save_ckpt(random_gpt(), tmp_path / "ckpt")
    code = ("import sys; from model import numpy_gpt; m = numpy_gpt.load(sys.argv[1]); "
            "assert m([1, 2, 3]).shape == (3, 320); assert 'torch' not in sys.modules, 'torch was imported'")
    run = subprocess.run([sys.executable, "-c", code, str(ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_refusals_say_what_to_do(tmp_path, capsys):
    ckpt = save_ckpt(random_gpt(), tmp_path / "ckpt")
    int8 = tmp_path / "int8"
    int8.mkdir()
    save_config(int8, random_gpt().config, BYTES.spec, kind="int8")
    with pytest.raises(CheckpointError, match="runs fp32 weights: pass the checkpoint it was made from"):
        numpy_gpt.load(int8)
    with pytest.raises(CheckpointError, match="No checkpoint folder"):
        numpy_gpt.load(tmp_path / "missing")
    mixed = tmp_path / "mixed"
    save_weights(save_ckpt(random_gpt(), mixed) / "model.safetensors", random_gpt(rotary=True))  # no wpe
    with pytest.raises(CheckpointError, match="transformer.wpe.weight missing"):
        numpy_gpt.load(mixed)
    penalized = SamplingConfig(max_new_tokens=2, repetition_penalty=1.3)
    with pytest.raises(ValueError, match="no repetition or frequency penalty"):
        next(numpy_gpt.decode_tokens(numpy_gpt.load(ckpt), [1], 1, penalized, 300))
    assert cli.main(["--ckpt", str(int8), "--prompt", "x", "--engine", "numpy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_an_untied_hugging_face_head_is_refused(hf_gpt2, tmp_path):
    path, _ = hf_gpt2
    untied = tmp_path / "untied"
    untied.mkdir()
    (untied / "config.json").write_bytes((path / "config.json").read_bytes())
    arrays = load_file(str(path / "model.safetensors"))
    save_file({**arrays, "lm_head.weight": arrays["transformer.wte.weight"] + 1.0}, str(untied / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head that differs from its token embedding"):
        numpy_gpt.load(untied)
    save_file({**arrays, "lm_head.weight": arrays["transformer.wte.weight"]}, str(untied / "model.safetensors"))
    assert numpy_gpt.load(untied).config.n_layer == 2  # a stored head equal to wte is fine
