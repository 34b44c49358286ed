"""Hugging Face GPT-2 import/export: logits match transformers both ways; clear errors for what we cannot load.

transformers is a test-only dependency: it builds small random GPT-2s offline (no downloads) and checks exports.
"""

from __future__ import annotations

import json

import pytest
import torch

import export_hf
import generate as generate_cli
import quantize
import train
from model.config import GPTConfig
from model.formats.checkpoint import CheckpointError, save_config, save_weights
from model.formats.export import export_checkpoint
from model.formats.hf import export_hf as export_model
from model.formats.hf import is_hf_dir, neox_names_for_ctranslate2
from model.formats.hf_tokenizer import token_strings
from model.formats.load import load
from model.generation.generate import SamplingConfig, decode_tokens, generate
from model.gpt import GPT
from model.tokenizer import build_tokenizer, padded_vocab_size

PROMPTS = ["ROMEO:", "To be, or not to be, that is the question:", "The quick brown fox jumps over the lazy dog.",
           "First Citizen:\nBefore we proceed any further, hear me speak."]
TOL = 1e-4


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers (test-only dependency, requirements-dev.txt) is not installed")


@pytest.fixture(scope="module")
def hf_model(transformers):
    """A small random GPT2LMHeadModel; every parameter (biases and LayerNorms too) is random so a mix-up shows."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=96, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def hf_dirs(hf_model, tmp_path_factory):
    """The model saved two ways: save_pretrained (model.safetensors, "transformer." keys, no lm_head) and a
    pytorch_model.bin as the hub's gpt2 has it (no key prefix, lm_head.weight and the attn.bias/masked_bias buffers)."""
    st = tmp_path_factory.mktemp("hf_st")
    hf_model.save_pretrained(st)
    (st / "pytorch_model.bin").unlink(missing_ok=True)
    binary = tmp_path_factory.mktemp("hf_bin")
    hf_model.config.save_pretrained(binary)
    n_pos = hf_model.config.n_positions
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items()}
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, binary / "pytorch_model.bin")
    return {"safetensors": st, "bin": binary}


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def max_diff(a_model, b_model, tokenizer, a_is_hf: bool = True, b_is_hf: bool = False) -> float:
    """Largest |logit difference| over all PROMPTS; also asserts the argmax agrees at every position."""
    worst = scale = 0.0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        a = (hf_logits if a_is_hf else our_logits)(a_model, ids)
        b = (hf_logits if b_is_hf else our_logits)(b_model, ids)
        assert a.shape == b.shape
        assert torch.equal(a.argmax(-1), b.argmax(-1)), prompt
        worst = max(worst, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
    print(f"  max |logit diff| {worst:.3g} over {len(PROMPTS)} prompts (max |logit| {scale:.3g})")
    return worst


@pytest.mark.parametrize("variant", ["safetensors", "bin"])
def test_import_matches_transformers(hf_model, hf_dirs, gpt2_tokenizer, variant):
    d = hf_dirs[variant]
    assert is_hf_dir(d)
    loaded = load(d)
    assert isinstance(loaded.model, GPT) and loaded.kind == "fp32"
    assert loaded.tokenizer.spec == {"name": "gpt2"} and loaded.meta["tokenizer"] == {"name": "gpt2"}
    assert loaded.config == GPTConfig(block_size=96, vocab_size=50257, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    print(f"import ({variant}), ours vs transformers:")
    assert max_diff(hf_model, loaded.model, gpt2_tokenizer) < TOL


@pytest.mark.slow
def test_export_matches_transformers(transformers, gpt2_tokenizer, tmp_path):
    """Our checkpoint (with and without biases) exported and loaded by transformers gives the same logits."""
    for bias in (True, False):
        torch.manual_seed(1)
        config = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, bias=bias)
        model = GPT(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        ckpt, out = tmp_path / f"ckpt{bias}", tmp_path / f"hf{bias}"
        ckpt.mkdir()
        save_weights(ckpt / "model.safetensors", model)
        save_config(ckpt, config, {"name": "gpt2"})
        export_checkpoint(ckpt, out)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == "gpt2" and cfg["n_positions"] == 64 and cfg["vocab_size"] == 50304
        assert cfg["activation_function"] == "gelu_new" and cfg["tie_word_embeddings"] is True and cfg["eos_token_id"] == 50256
        hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        print(f"export (bias={bias}), transformers vs ours:")
        assert max_diff(model, hf, gpt2_tokenizer, a_is_hf=False, b_is_hf=True) < TOL
        assert is_hf_dir(out) and max_diff(model, load(out).model, gpt2_tokenizer, a_is_hf=False) < TOL  # and back


VARIANTS = [  # rotary, mlp, bias: the transformers class an export of that block loads as
    (True, "gelu", True, "GPTNeoXForCausalLM"),
    (True, "relu2", False, "GPTNeoXForCausalLM"),
    (False, "relu2", True, "GPT2LMHeadModel"),
]


def random_gpt(**variant) -> GPT:
    """A tiny GPT of a block variant with every parameter random (LayerNorms and biases too), so any mix-up shows."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=320, n_layer=2, n_head=4, n_embd=64, **variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("rotary, mlp, bias, arch", VARIANTS)
def test_block_variants_export_with_logit_parity(transformers, tmp_path, rotary, mlp, bias, arch):
    """A rotary GPT exports as GPT-NeoX (sequential residuals, rotary over the whole head, tied head), a learned-position
    relu2 one as GPT-2 with relu2: AutoModelForCausalLM loads that class, whose logits on random tokens are ours, and
    the GPT-2 tokenizer files are written as for any export."""
    model = random_gpt(rotary=rotary, mlp=mlp, bias=bias)
    tokenizer = build_tokenizer("bytes", "")
    export_model(model, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [arch] and cfg["eos_token_id"] == tokenizer.eot_token
    if rotary:
        assert cfg["use_parallel_residual"] is False and cfg["rotary_pct"] == 1.0 and cfg["rotary_emb_base"] == 10000
        assert cfg["hidden_act"] == {"gelu": "gelu_new", "relu2": "relu2"}[mlp] and cfg["attention_bias"] is bias
        assert cfg["intermediate_size"] == 4 * 64 and cfg["max_position_embeddings"] == 32 and cfg["tie_word_embeddings"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == arch
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()  # tied
    ids = torch.randint(0, model.config.vocab_size, (2, model.config.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[0], hf(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"  {arch} ({mlp}, bias={bias}): max |logit diff| {diff:.3g} (max |logit| {ours.abs().max().item():.3g})")
    assert diff < TOL
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(model.config.vocab_size))  # one string per embedding row
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok(PROMPTS[0])["input_ids"] == tokenizer.encode(PROMPTS[0]) and hf_tok.eos_token_id == tokenizer.eot_token
    if not rotary:  # GPT-2 directories import back; GPT-NeoX ones do not
        back = load(tmp_path).model
        with torch.no_grad():
            assert back.config == model.config and (back(ids)[0] - ours).abs().max().item() < TOL


@pytest.mark.parametrize("rotary", [True, False])
def test_qk_norm_export_is_refused(tmp_path, rotary):
    """No standard transformers class RMS-normalises q and k per head inside LayerNorm blocks: refused, nothing written."""
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16, rotary=rotary, qk_norm=True))
    with pytest.raises(CheckpointError, match="no standard transformers class .* train it with --no-qk-norm"):
        export_model(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hf_dir_roundtrip_through_export(transformers, hf_model, hf_dirs, gpt2_tokenizer, tmp_path):
    export_checkpoint(hf_dirs["bin"], tmp_path / "again")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again").eval()
    assert max_diff(hf_model, again, gpt2_tokenizer, b_is_hf=True) < TOL


@pytest.mark.slow
def test_finetune_quantize_generate_from_imported(hf_dirs, tmp_path, capsys):
    """train.py --init-from HF_DIR lowers the validation loss; quantize.py and generation work on the result;
    generate.py --ckpt HF_DIR samples."""
    text = tmp_path / "tiny.txt"
    text.write_text("Hark, the night is young and the moon is bright upon the hill. " * 12, encoding="utf-8")
    ft = tmp_path / "ft"
    assert train.main(["--init-from", str(hf_dirs["safetensors"]), "--data", str(text), "--out-dir", str(ft), "--device", "cpu",
                       "--dtype", "fp32", "--block-size", "16", "--batch-size", "4", "--max-iters", "6", "--eval-interval", "6",
                       "--lr", "3e-2", "--warmup-iters", "1"]) == 0
    records = [json.loads(line) for line in (ft / "log.jsonl").read_text().splitlines()]
    before = next(r["val_nats_per_token"] for r in records if r["step"] == 0 and "val_nats_per_token" in r)
    after = json.loads((ft / "metrics.json").read_text())["val_nats_per_token"]
    assert after < before - 1.0, (before, after)  # ~11 nats/token at the start: random weights
    assert load(ft).meta["train"]["init_from"] == str(hf_dirs["safetensors"])
    q = tmp_path / "q"
    assert quantize.main(["--ckpt", str(ft), "--out", str(q), "--data", str(text), "--gen-tokens", "4", "--repeats", "1"]) == 0
    for ckpt, kind in ((hf_dirs["bin"], "fp32"), (q, "int8")):
        loaded = load(ckpt)
        assert loaded.kind == kind
        out = generate(loaded.model, loaded.tokenizer, "ROMEO:", 2, SamplingConfig(max_new_tokens=5, seed=0))
        assert len(out) == 2 and all(o for o in out)
    capsys.readouterr()
    assert generate_cli.main(["--ckpt", str(hf_dirs["safetensors"]), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert "ROMEO:" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["gpt2", "gpt2-compact", "bytes"])
def test_export_writes_a_tokenizer_transformers_reads(transformers, gpt2_tokenizer, tmp_path, name):
    """vocab.json + merges.txt make transformers' GPT-2 tokenizer encode exactly as ours; load() gets our spec back."""
    text = "".join(PROMPTS) + " Zoë's café — naïve 😀 résumé\n\tend"
    tokenizer = build_tokenizer(name, text)
    model = GPT(GPTConfig(block_size=32, vocab_size=padded_vocab_size(tokenizer.n_vocab), n_layer=1, n_head=2, n_embd=16))
    export_model(model, tokenizer, tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(model.config.vocab_size))  # one string per embedding row, padding too
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.eos_token_id == tokenizer.eot_token
    for prompt in [*PROMPTS, text]:
        ids = tokenizer.encode(prompt)
        assert hf_tok(prompt)["input_ids"] == ids, prompt
        assert hf_tok.decode(ids) == prompt
    assert load(tmp_path).tokenizer.spec == tokenizer.spec


@pytest.mark.parametrize("rotary", [False, True])
def test_ctranslate2_converts_an_export_and_decodes_our_greedy_tokens(transformers, tmp_path, rotary):
    """The export (GPT-2, or GPT-NeoX for rotary) converts with CTranslate2 as it is (vocab.json as long as the embedding),
    and CTranslate2's greedy tokens from the vocabulary strings of our prompt ids are ours."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (requirements-dev.txt) is not installed")
    tokenizer = build_tokenizer("gpt2-compact", " ".join(PROMPTS) * 3)
    assert padded_vocab_size(tokenizer.n_vocab) > tokenizer.n_vocab  # so placeholders are written and converted
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=padded_vocab_size(tokenizer.n_vocab), n_layer=2, n_head=2, n_embd=32,
                          rotary=rotary)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)  # large weights: decisive logits, and an output that depends on the context
    export_model(model, tokenizer, tmp_path / "hf")
    with neox_names_for_ctranslate2():  # CTranslate2 4.8's NeoX converter reads two names transformers 5 dropped
        ctranslate2.converters.TransformersConverter(str(tmp_path / "hf")).convert(str(tmp_path / "ct2"), quantization="float32")
    ids = tokenizer.encode(PROMPTS[1])
    ours = torch.stack(list(decode_tokens(model, ids, 1, SamplingConfig(max_new_tokens=8, temperature=0), model.config.vocab_size)))
    strings = token_strings(tmp_path / "hf")
    generator = ctranslate2.Generator(str(tmp_path / "ct2"), device="cpu", intra_threads=1)
    result = generator.generate_batch([[strings[i] for i in ids]], max_length=8, min_length=8, sampling_topk=1,
                                      include_prompt_in_result=False, end_token=[])
    assert result[0].sequences_ids[0] == ours[:, 0].tolist()
    assert len(set(result[0].sequences_ids[0])) > 1  # not one token over and over


def write_hf_config(d, **overrides):
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_head": 2, "n_embd": 8,
           "n_positions": 16, "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    cfg.update(overrides)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_config_without_weights_is_a_clear_error(tmp_path):
    d = write_hf_config(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        load(d)


@pytest.mark.parametrize("override, message", [
    ({"activation_function": "relu"}, "activation_function 'relu'; this kit runs only GPT-2's tanh GELU"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06"),
    ({"n_inner": 16}, "n_inner=16"),
    ({"scale_attn_by_inverse_layer_idx": True}, "an attention variant this kit does not implement"),
    ({"vocab_size": 1000}, "does not use GPT-2's tokenizer"),
    ({"n_head": 3}, "invalid GPT-2 setting: n_embd \\(8\\) must be divisible by n_head \\(3\\)"),
])
def test_unsupported_config_is_a_clear_error(tmp_path, override, message):
    d = write_hf_config(tmp_path / "hf", **override)
    with pytest.raises(CheckpointError, match=message):
        load(d)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_weights_are_a_clear_error(tmp_path, name):
    d = write_hf_config(tmp_path / "hf")
    (d / name).write_bytes(b"\x00garbage, not a weights file" * 10)
    with pytest.raises(CheckpointError, match="download or copy it again"):
        load(d)


def test_wrong_shapes_are_a_clear_error(hf_dirs, tmp_path):
    """Weights of one GPT-2 under the config of another: caught by our loader, not a bare torch error."""
    d = write_hf_config(tmp_path / "hf")
    (d / "model.safetensors").write_bytes((hf_dirs["safetensors"] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="do not match its config"):
        load(d)


def test_untied_head_is_a_clear_error(hf_dirs, tmp_path):
    src = hf_dirs["bin"]
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lm_head that differs from its token embedding"):
        load(tmp_path)


def test_our_checkpoint_is_not_taken_for_hf(tmp_path):
    model = GPT(GPTConfig.from_name("tiny"))
    save_weights(tmp_path / "model.safetensors", model)
    save_config(tmp_path, model.config, {"name": "gpt2"})
    assert not is_hf_dir(tmp_path)
    assert load(tmp_path).meta.get("source") is None


def test_export_refuses_int8(tmp_path):
    model = GPT(GPTConfig.from_name("tiny"))
    save_weights(tmp_path / "model.safetensors", model)
    save_config(tmp_path, model.config, {"name": "gpt2"}, kind="int8")
    with pytest.raises(CheckpointError, match="int8 checkpoint; export the fp32"):
        export_checkpoint(tmp_path, tmp_path / "hf")
    quantized = torch.ao.quantization.quantize_dynamic(model.eval(), {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(CheckpointError, match="quantized"):
        export_model(quantized, None, tmp_path / "hf2")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf2").exists()


def test_cli_exports_and_reports_errors_in_one_line(tmp_path, capsys):
    model = GPT(GPTConfig.from_name("tiny"))
    save_weights(tmp_path / "model.safetensors", model)
    save_config(tmp_path, model.config, {"name": "gpt2"})
    assert export_hf.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")]) == 0
    assert is_hf_dir(tmp_path / "hf") and (tmp_path / "hf" / "model.safetensors").is_file()
    assert export_hf.main(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: No checkpoint at") and "\n" not in err
    assert export_hf.main(["--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path)]) == 2  # would overwrite our checkpoint
    assert "already holds a checkpoint of this kit" in capsys.readouterr().err


def save_tiny_checkpoint(ckpt, **variant) -> None:
    """A random tiny GPT of a block variant saved as our fp32 checkpoint with the bytes tokenizer."""
    model = GPT(GPTConfig(block_size=16, vocab_size=320, n_layer=1, n_head=2, n_embd=16, **variant))
    ckpt.mkdir()
    save_weights(ckpt / "model.safetensors", model)
    save_config(ckpt, model.config, {"name": "bytes"})


def test_cli_names_the_class_it_wrote_and_refuses_qk_norm(tmp_path, capsys):
    """export_hf.py says which transformers class it wrote (exporting again over its own export works); a qk_norm model
    is refused in one line that says what to do."""
    for name, variant, arch in (("classic", {}, "GPT2LMHeadModel"), ("rotary", {"rotary": True}, "GPTNeoXForCausalLM")):
        save_tiny_checkpoint(tmp_path / name, **variant)
        for _ in range(2):
            assert export_hf.main(["--ckpt", str(tmp_path / name), "--out", str(tmp_path / f"{name}_hf")]) == 0
            assert f"as a {arch} " in capsys.readouterr().out
    save_tiny_checkpoint(tmp_path / "qk", rotary=True, qk_norm=True)
    assert export_hf.main(["--ckpt", str(tmp_path / "qk"), "--out", str(tmp_path / "qk_hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--no-qk-norm" in err and "\n" not in err
    assert not (tmp_path / "qk_hf").exists()
