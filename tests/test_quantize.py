"""int8 quantization: accuracy against fp32, one int8 copy of the tied matrix, bit-identical save/load,
size, the generation engine, the CLI's report, and one clear error (never an unpickled payload) for bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quantize as quantize_cli
from model.config import GPTConfig
from model.formats.checkpoint import WEIGHTS, CheckpointError, save_config, save_weights
from model.formats.int8 import ENGINE_PREFERENCE, Int8Embedding, int8_state, load_int8, quantize_model, save_int8, set_engine
from model.formats.load import load
from model.generation.generate import SamplingConfig, decode_tokens
from model.gpt import GPT

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 8  # ~600 characters


def tiny_gpt(vocab_size: int = 512, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig.from_name("tiny")
    config.vocab_size = vocab_size
    return GPT(config).eval()


def save_ckpt(path, model: GPT, train: dict | None = None):
    save_weights(path / WEIGHTS, model)
    save_config(path, model.config, {"name": "gpt2"}, train or {})
    return path


@pytest.fixture
def fp32_ckpt(tmp_path, gpt2_tokenizer):
    """A tiny fp32 checkpoint with GPT-2's padded vocabulary, trained on nothing, recording a small text."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return save_ckpt(tmp_path / "ckpt", tiny_gpt(vocab_size=50304), {"data": str(text)})


def test_deprecation_canary():
    """torch.ao.quantization is deprecated in favour of torchao: this fails loudly the day quantize_dynamic goes."""
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import quantize_dynamic

    set_engine()
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(16, 8))
    with warnings.catch_warnings():  # its deprecation notices are expected; this test is the tripwire instead
        warnings.simplefilter("ignore")
        q = quantize_dynamic(fp32, {nn.Linear}, dtype=torch.qint8)
    assert type(q[0]) is nnqd.Linear
    assert q[0].weight().dtype == torch.qint8
    x = torch.randn(3, 16)
    assert torch.allclose(q[0](x), fp32(x), atol=0.05)


def test_engine_set_explicitly():
    supported = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = supported[0]
    expected = next(name for name in ENGINE_PREFERENCE if name in supported)
    quantize_model(tiny_gpt())
    assert torch.backends.quantized.engine == expected


@pytest.mark.parametrize("scheme", ["per_channel", "per_tensor"])
def test_int8_logits_close_to_fp32(scheme):
    # Measured on this tiny random model: max |logit diff| 0.021 (logits up to 1.2), KL 8e-6 nats, argmax 99.6% equal.
    model = tiny_gpt()
    qmodel = quantize_model(model, scheme)
    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x)[0], qmodel(x)[0]
    assert (a - b).abs().max() < 0.05
    kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1).mean()
    assert kl < 5e-5
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97
    assert not torch.equal(a, b)  # it really is a different (quantized) computation


def test_tied_matrix_stored_once_as_int8():
    qmodel = quantize_model(tiny_gpt())
    assert isinstance(qmodel.transformer.wte, Int8Embedding)
    state = int8_state(qmodel)
    assert not any(k.startswith("transformer.wte") or k == "lm_head.weight" for k in state)
    assert state["lm_head.weight_int8"].dtype == torch.int8 and state["lm_head.weight_int8"].shape == (512, 64)
    assert torch.equal(qmodel.transformer.wte.weight_int8, state["lm_head.weight_int8"])
    assert {k for k, t in state.items() if t.is_floating_point() and t.dim() > 1} == {"transformer.wpe.weight"}  # only matrix left fp32


@pytest.mark.parametrize("variant", [{}, {"rotary": True, "mlp": "relu2"}], ids=["classic", "rotary-relu2"])
def test_save_load_round_trip_is_bit_identical(tmp_path, variant):
    torch.manual_seed(0)
    qmodel = quantize_model(GPT(dataclasses.replace(GPTConfig.from_name("tiny"), vocab_size=512, **variant)).eval())
    save_int8(tmp_path, qmodel, {"tokenizer": {"name": "gpt2"}, "train": {}})
    loaded, cfg = load_int8(tmp_path)
    assert cfg["kind"] == "int8"
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(qmodel(x)[0], loaded(x)[0])
        for m in (qmodel, loaded):
            m.setup_caches(2, 64)
        pos = torch.arange(40)
        assert torch.equal(qmodel(x, input_pos=pos, last_only=True)[0], loaded(x, input_pos=pos, last_only=True)[0])


def test_size_ratio_and_load_kind(fp32_ckpt, tmp_path):
    fp32 = load(fp32_ckpt)
    save_int8(tmp_path / "int8", quantize_model(fp32.model), fp32.meta)
    ratio = (fp32_ckpt / WEIGHTS).stat().st_size / (tmp_path / "int8" / WEIGHTS).stat().st_size
    assert ratio > 3.5  # measured 3.69 for this tiny model; the 4x limit is approached as the fp32 LayerNorms shrink in share
    int8 = load(tmp_path / "int8")
    assert (fp32.kind, int8.kind) == ("fp32", "int8")
    assert int8.tokenizer.decode(int8.tokenizer.encode("Speak, speak.")) == "Speak, speak."


def test_int8_model_runs_in_generation_engine(tmp_path):
    qmodel = quantize_model(tiny_gpt())
    save_int8(tmp_path, qmodel, {"tokenizer": {"name": "gpt2"}, "train": {}})
    loaded, _ = load_int8(tmp_path)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0, seed=0)  # 60 + 12 tokens pass the 64-token context
    prompt = list(range(1, 61))
    runs = [torch.cat(list(decode_tokens(m, prompt, 1, greedy, 512))) for m in (qmodel, loaded)]
    assert runs[0].shape == (12,) and torch.equal(runs[0], runs[1])


def test_cli_writes_checkpoint_and_report(fp32_ckpt, capsys):
    (fp32_ckpt / "metrics.json").write_text(json.dumps({"val_nats_per_char": 1.5}))
    assert quantize_cli.main(["--ckpt", str(fp32_ckpt), "--gen-tokens", "4", "--repeats", "1"]) == 0
    out = fp32_ckpt / "int8"
    report = json.loads((out / "report.json").read_text())
    for key in quantize_cli.ROWS:
        assert report[key] is not None and report[key] > 0, key
    assert report["size_ratio"] > 3.5 and report["top1_agreement"] > 0.9
    assert abs(report["val_nats_per_char_int8"] / report["val_nats_per_char_fp32"] - 1) < 0.01
    assert json.loads((out / "config.json").read_text())["kind"] == "int8"
    assert json.loads((out / "metrics.json").read_text()) == {"val_nats_per_char": 1.5}
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "size_ratio" in capsys.readouterr().out


class _Payload:
    """Unpickling this creates a marker file: proof that a loader executed code from a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_fp32(kind, ckpt, tmp_path):
    if kind == "missing":
        return tmp_path / "nowhere"
    if kind == "not_a_checkpoint":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    weights = ckpt / WEIGHTS
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "corrupt":
        weights.write_bytes(b"\x07" * 4096)
    elif kind == "pickle":
        weights.write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    elif kind == "already_int8":
        fp32 = load(ckpt)
        save_int8(tmp_path / "q", quantize_model(fp32.model), fp32.meta)
        return tmp_path / "q"
    return ckpt


@pytest.mark.parametrize("kind", ["missing", "not_a_checkpoint", "truncated", "corrupt", "pickle", "already_int8"])
def test_cli_bad_checkpoint_is_one_clear_error(kind, fp32_ckpt, tmp_path, capsys):
    ckpt = _bad_fp32(kind, fp32_ckpt, tmp_path)
    out = tmp_path / "out_int8"
    assert quantize_cli.main(["--ckpt", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith((".", ")")), err
    assert "Traceback" not in err[0]
    assert not out.exists()  # nothing half-written
    assert not (tmp_path / "pwned").exists()


def test_cli_missing_data_writes_nothing(fp32_ckpt, tmp_path, capsys):
    out = tmp_path / "out_int8"
    assert quantize_cli.main(["--ckpt", str(fp32_ckpt), "--out", str(out), "--data", str(tmp_path / "no.txt")]) == 2
    assert capsys.readouterr().err.startswith("error: No training text")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["pickle", "truncated", "fp32_weights", "missing_tensor", "nan_scale", "zero_scale",
                                    "float_zero_point", "inf_bias", "nan_layernorm", "int32_position_embedding",
                                    "scalar_scale", "zero_point_out_of_range"])
def test_bad_int8_checkpoint_is_refused(damage, tmp_path):
    qmodel = quantize_model(tiny_gpt())
    ckpt = tmp_path / "q"
    save_int8(ckpt, qmodel, {"tokenizer": {"name": "gpt2"}, "train": {}})
    weights = ckpt / WEIGHTS
    if damage == "pickle":
        weights.write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "fp32_weights":  # an fp32 state under a config that says int8
        save_weights(weights, tiny_gpt())
    else:
        from safetensors.torch import load_file, save_file

        state, fc = load_file(str(weights)), "transformer.h.1.mlp.c_fc"
        if damage == "missing_tensor":
            del state[f"{fc}.weight_scale"]
        elif damage == "nan_scale":
            state[f"{fc}.weight_scale"][2] = float("nan")
        elif damage == "zero_scale":
            state[f"{fc}.weight_scale"][2] = 0.0
        elif damage == "float_zero_point":
            state[f"{fc}.weight_zero_point"] = state[f"{fc}.weight_zero_point"].float() + 0.5
        elif damage == "scalar_scale":  # 0-d: a raw IndexError before
            state[f"{fc}.weight_scale"] = state[f"{fc}.weight_scale"][0].clone()
            state[f"{fc}.weight_zero_point"] = state[f"{fc}.weight_zero_point"][0].clone()
        elif damage == "zero_point_out_of_range":  # an integer, but outside qint8: a raw RuntimeError before
            state[f"{fc}.weight_zero_point"] = state[f"{fc}.weight_zero_point"].to(torch.int32) + 500
        elif damage == "inf_bias":
            state[f"{fc}.bias"][0] = float("inf")
        elif damage == "nan_layernorm":
            state["transformer.ln_f.weight"][0] = float("nan")
        else:
            state["transformer.wpe.weight"] = state["transformer.wpe.weight"].to(torch.int32)
        save_file(state, str(weights))
    with pytest.raises(CheckpointError) as info:
        load_int8(ckpt)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


QUICK = ["--eval-windows", "1", "--gen-tokens", "2", "--repeats", "1"]


def _old_output(out):
    """An earlier quantize.py output: int8 weights of another model and a report that describes them."""
    save_int8(out, quantize_model(tiny_gpt(vocab_size=50304, seed=7)), {"tokenizer": {"name": "gpt2"}, "train": {}})
    (out / "metrics.json").write_text('{"old": true}')
    (out / "report.json").write_text('{"old": true}')
    (out / "report.png").write_bytes(b"old png")
    return {p.name: p.read_bytes() for p in out.iterdir()}


KILL_DURING_QUANTIZE = """
import os, signal, sys
import quantize
quantize.tokens_per_second = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed while measuring speed
quantize.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigkill_during_quantize_leaves_the_old_output_whole(fp32_ckpt):
    """kill -9 mid-run leaves OUT all-old (never new weights beside an old report); the next run cleans up and replaces it."""
    (fp32_ckpt / "metrics.json").write_text(json.dumps({"val_nats_per_char": 1.5}))
    out = fp32_ckpt / "int8"
    old = _old_output(out)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_QUANTIZE, "--ckpt", str(fp32_ckpt), *QUICK],
                          env={**os.environ, "PYTHONPATH": str(root)}, cwd=root, timeout=300, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert quantize_cli.main(["--ckpt", str(fp32_ckpt), *QUICK]) == 0
    assert json.loads((out / "report.json").read_text())["int8_checkpoint"] == str(out)
    assert json.loads((out / "metrics.json").read_text()) == {"val_nats_per_char": 1.5}
    assert sorted(p.name for p in fp32_ckpt.iterdir()) == ["config.json", "int8", "metrics.json", "model.safetensors"]


def test_failure_after_the_weights_leaves_the_old_output_whole(fp32_ckpt, monkeypatch):
    out = fp32_ckpt / "int8"
    old = _old_output(out)

    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(quantize_cli, "plot_report", broken_plot)
    with pytest.raises(OSError):
        quantize_cli.main(["--ckpt", str(fp32_ckpt), *QUICK])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in fp32_ckpt.iterdir()) == ["config.json", "int8", "model.safetensors"]


def test_cli_refuses_to_replace_a_folder_that_is_not_its_output(fp32_ckpt, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    assert quantize_cli.main(["--ckpt", str(fp32_ckpt), "--out", str(mine), *QUICK]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert [p.name for p in mine.iterdir()] == ["todo.txt"]
    link = tmp_path / "int8-link"
    link.symlink_to(mine)
    assert quantize_cli.main(["--ckpt", str(fp32_ckpt), "--out", str(link), *QUICK]) == 2  # not a traceback
    assert "symbolic link" in capsys.readouterr().err
    assert link.is_symlink() and [p.name for p in mine.iterdir()] == ["todo.txt"]


def test_cli_progress_without_a_terminal_is_plain_lines(fp32_ckpt, capsys):
    """`python quantize.py > log 2>&1`: plain progress lines (model/progress.py), no tqdm \r redraws."""
    assert quantize_cli.main(["--ckpt", str(fp32_ckpt), *QUICK]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("quantize: ")]
    assert lines[0].startswith("quantize: 0/4 step (0%)") and lines[0].endswith(", converting")
    assert lines[-1].startswith("quantize: 4/4 step (100%)")


def test_cli_output_gets_the_modes_open_and_mkdir_give(fp32_ckpt, tmp_path):
    (fp32_ckpt / "metrics.json").write_text("{}")
    out = tmp_path / "q" / "int8"
    assert quantize_cli.main(["--ckpt", str(fp32_ckpt), "--out", str(out), *QUICK]) == 0
    with open(tmp_path / "plain", "w"):
        pass
    (tmp_path / "plain_dir").mkdir()
    file_mode, dir_mode = ((tmp_path / n).stat().st_mode & 0o777 for n in ("plain", "plain_dir"))
    assert oct(out.stat().st_mode & 0o777) == oct(dir_mode)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "config.json", "metrics.json", "report.json", "report.png"], oct(file_mode))


@pytest.mark.parametrize("metrics", [{"params": 12_345, "best_step": 0}, {"params": "PARAMS", "best_step": 30}],
                         ids=["other_params", "other_step"])
def test_cli_refuses_metrics_of_other_weights(metrics, tmp_path, capsys):
    """metrics.json must describe the weights beside it: another parameter count, or another step than the weights
    record, is one clear error and no output."""
    ckpt = tmp_path / "ckpt"
    model = tiny_gpt()
    save_weights(ckpt / WEIGHTS, model, step=40)
    save_config(ckpt, model.config, {"name": "gpt2"})
    if metrics["params"] == "PARAMS":
        metrics["params"] = model.num_params()
    (ckpt / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "int8"
    assert quantize_cli.main(["--ckpt", str(ckpt), "--out", str(out), *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "describes other weights than" in err[0] and err[0].endswith("."), err
    assert not out.exists()
    metrics.update(params=model.num_params(), best_step=40)  # the same weights: quantized, metrics copied
    (ckpt / "metrics.json").write_text(json.dumps(metrics))
    assert quantize_cli.main(["--ckpt", str(ckpt), "--out", str(out), *QUICK]) == 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
