"""The static-site export without a browser: tokenizer.json against tiktoken, the ONNX files of every block variant
checked in onnxruntime, the folder's layout, and the refusals of export_web.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from model_support import tiny_gpt
from site_support import ODD_TEXTS, check_site_folder

from model.formats import onnx, site
from model.formats.checkpoint import CheckpointError, save_config, save_weights
from model.formats.hf_tokenizer import tokenizer_json, write_tokenizer_files
from model.tokenizer import build_tokenizer, byte_level, gpt2

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"classic": {}, "rotary": {"rotary": True}, "rotary-qk_norm-relu2": {"rotary": True, "qk_norm": True, "mlp": "relu2"}}


def tiny_checkpoint(out: Path, **variant) -> Path:
    """A tiny random fp32 checkpoint over the bytes tokenizer (257 tokens)."""
    model = tiny_gpt(vocab=320, block=16, **variant)
    save_weights(out / "model.safetensors", model)
    save_config(out, model.config, byte_level().spec)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-compact", "gpt2", "bytes"])
def test_tokenizer_json_encodes_as_tiktoken(name, shakespeare_path):
    """tokenizer.json, read by the tokenizers library, gives tiktoken's ids (encode_ordinary) on all of input.txt and on
    text the vocabulary was not built from; "<|endoftext|>" in a text is plain text. The Hugging Face export writes it."""
    from tokenizers import Tokenizer as HFTokenizer

    text = shakespeare_path.read_text(encoding="utf-8")
    tokenizer = {"gpt2-compact": lambda: build_tokenizer("gpt2-compact", text[:300_000], 5), "gpt2": gpt2,
                 "bytes": byte_level}[name]()
    hf = HFTokenizer.from_str(tokenizer_json(tokenizer, tokenizer.n_vocab + 7))
    for t in (text, *ODD_TEXTS):
        assert hf.encode(t, add_special_tokens=False).ids == tokenizer.encode(t), t[:40]


def test_the_hugging_face_export_writes_tokenizer_json(tmp_path):
    tokenizer = byte_level()
    write_tokenizer_files(tokenizer, tmp_path, 16, 320)
    written = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert written["model"]["type"] == "BPE" and len(written["model"]["vocab"]) == 320
    assert written["added_tokens"] == []  # so "<|endoftext|>" in a text stays plain text


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_block_variant_exports_and_onnxruntime_agrees(tmp_path, variant):
    """Learned positions, rotary, qk-norm with ReLU²: the ONNX files run in onnxruntime, as a prompt and then one token
    at a time over past keys and values, and agree with the model (fp32 logits to 1e-3; int8 no further off than twice
    our torch int8 model)."""
    model = tiny_gpt(vocab=101, block=32, **VARIANTS[variant])
    fp32, int8 = onnx.export_onnx(model, tmp_path / "model.onnx"), tmp_path / "model_quantized.onnx"
    onnx.quantize_onnx(fp32, int8)
    checks = onnx.check_onnx(model, fp32, int8)
    assert checks["fp32_max_abs"] < 1e-4
    assert checks["int8_mean_abs_logprob"] <= 2 * checks["torch_int8_mean_abs_logprob"] + onnx.INT8_SLACK
    inputs = onnx.session(int8).get_inputs()
    assert [i.name for i in inputs] == onnx.input_names(model.config.n_layer)  # transformers.js's names
    # transformers.js sizes an empty past from these: "batch_size" is the batch, any other name 0
    assert inputs[2].shape == ["batch_size", 2, "past_sequence_length", 16]


@pytest.mark.slow
def test_the_check_catches_a_file_of_another_model(tmp_path):
    model = tiny_gpt(vocab=101, block=32)
    fp32, int8 = onnx.export_onnx(model, tmp_path / "model.onnx"), tmp_path / "model_quantized.onnx"
    onnx.quantize_onnx(fp32, int8)
    with pytest.raises(onnx.OnnxExportError, match="differs from the model"):
        onnx.check_onnx(tiny_gpt(vocab=101, block=32, seed=1), fp32, int8)


@pytest.mark.slow
def test_the_site_folder_is_a_static_space_that_loads_only_its_own_files(tmp_path, monkeypatch):
    """One export (qk-norm, the variant no transformers class loads): Space front matter, the transformers.js layout,
    the runtime copied in, every URL the page names relative; a model over the size limit is written with a warning
    that gives its size."""
    monkeypatch.setattr(site, "PAGE_LIMIT_BYTES", 1000)
    ckpt = tiny_checkpoint(tmp_path / "ckpt", rotary=True, qk_norm=True)
    out = site.export_site(ckpt, tmp_path / "site", title="My model")
    check_site_folder(out.path)
    assert not (out.path / "config.json").exists()  # qk_norm: no transformers.js config (the docs say so)
    settings = json.loads((out.path / "smallgpt.json").read_text(encoding="utf-8"))
    assert settings["eot"] == 256 and settings["keep"] == 8 and settings["title"] == "My model"
    assert out.warning and f"{out.int8_bytes / 1e6:.0f} MB" in out.warning


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export_web.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_refuses_an_int8_checkpoint_and_a_foreign_folder(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "int8").mkdir()
    (tmp_path / "int8" / "config.json").write_text(json.dumps({**config, "kind": "int8"}), encoding="utf-8")
    done = run_cli("--ckpt", str(tmp_path / "int8"), "--out", str(tmp_path / "site"))
    assert done.returncode == 2 and "int8 checkpoint; pass the fp32 checkpoint" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "site").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me", encoding="utf-8")
    done = run_cli("--ckpt", str(ckpt), "--out", str(tmp_path / "mine"))
    assert done.returncode == 2 and "is not an earlier site export" in done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_missing_runtime_files_say_which_command_installs_them(tmp_path, monkeypatch):
    monkeypatch.setattr(site, "WEB", tmp_path / "web")
    with pytest.raises(CheckpointError, match=r"install them once with: npm ci --prefix web$"):
        site.export_site(tiny_checkpoint(tmp_path / "ckpt"), tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_export_leaves_the_model_as_it_was(tmp_path):
    """Export swaps the model's caches for the graph's and puts them back."""
    model = tiny_gpt(vocab=101, block=32)
    model.setup_caches(2)
    cache, mask = model.transformer.h[0].attn.kv_cache, model.causal_mask
    with onnx._export_mode(model):
        assert isinstance(model.transformer.h[0].attn.kv_cache, onnx.ConcatCache)
    assert model.transformer.h[0].attn.kv_cache is cache and model.causal_mask is mask
