"""What a user gets wrong at an entry point is one sentence and exit status 2, before anything is allocated or written:
a seed out of range, and a model shape, from flags or a config.json, too big for this machine's memory."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import TEXT, tiny_config

import app as app_cli
import generate as generate_cli
import model.config as config_module
import quantize as quantize_cli
import train as train_cli
from model.config import check_generation, memory_needed, sequence_memory
from model.formats import checkpoint
from model.gpt import GPT

ROOT = Path(__file__).resolve().parent.parent

SMALL_RUN = ["--preset", "tiny", "--tokenizer", "bytes", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
             "--dtype", "fp32", "--device", "cpu", "--max-minutes", "0", "--max-iters", "2", "--threads", "1"]


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def one_error(capsys) -> str:
    """The one line a refused command wrote to stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith("."), err
    return err[0]


@pytest.mark.parametrize("seed", ["1180591620717411303424", str(2**64), "-1"])
def test_train_refuses_a_seed_out_of_range_before_writing_anything(seed, text, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(out), "--seed", seed]) == 2
    assert f"--seed must be an integer from 0 to {2**64 - 1}" in one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("seed", ["1180591620717411303424", "-1"])
def test_generate_refuses_a_seed_out_of_range(seed, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    checkpoint.save_model(ckpt, GPT(tiny_config()), {"name": "bytes"}, {}, step=0)
    assert generate_cli.main(["--ckpt", str(ckpt), "--prompt", "hi", "--seed", seed]) == 2
    assert f"seed must be an integer from 0 to {2**64 - 1}" in one_error(capsys)


def test_train_accepts_the_largest_seed(text, tmp_path):
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(tmp_path / "out"), "--seed", str(2**64 - 1)]) == 0


def test_train_refuses_a_shape_too_big_for_this_machine_before_writing_anything(text, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_cli.main(["--data", str(text), "--out-dir", str(out), "--n-embd", "100000", "--n-head", "4", "--n-layer", "1"]) == 2
    assert "GB of memory" in one_error(capsys)
    assert not out.exists()


@pytest.fixture(params=[("vocab_size", 10**12), ("block_size", 10**10)], ids=["vocab", "context"])
def huge(request, tmp_path) -> Path:
    """A checkpoint of a tiny model whose config.json claims a shape no machine holds."""
    ckpt = tmp_path / "huge"
    model = GPT(tiny_config())
    checkpoint.save_model(ckpt, model, {"name": "bytes"}, {}, step=0)
    cfg = json.loads((ckpt / checkpoint.CONFIG).read_text())
    cfg["model"][request.param[0]] = request.param[1]
    (ckpt / checkpoint.CONFIG).write_text(json.dumps(cfg))
    return ckpt


@pytest.mark.parametrize("entry", ["generate", "quantize", "train --init-from", "app"])
def test_a_config_too_big_for_this_machine_is_one_sentence_at_every_entry_point(entry, huge, text, tmp_path, capsys,
                                                                                 monkeypatch):
    out = tmp_path / "out"
    if entry == "generate":
        rc = generate_cli.main(["--ckpt", str(huge), "--prompt", "hi", "--max-new-tokens", "2"])
    elif entry == "quantize":
        rc = quantize_cli.main(["--ckpt", str(huge), "--out", str(out)])
    elif entry == "train --init-from":
        rc = train_cli.main([*SMALL_RUN[4:], "--init-from", str(huge), "--data", str(text), "--out-dir", str(out)])
    else:
        monkeypatch.setattr(sys, "argv", ["app.py", "--ckpt", str(huge), "--no-train"])
        rc = app_cli.main()
    assert rc == 2
    assert "GB of memory to load and run, more than this machine's" in one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("what", ["loop", "broken link"])
def test_train_names_an_out_dir_that_is_a_bad_link(what, text, tmp_path, capsys):
    out = tmp_path / "out"
    out.symlink_to("out" if what == "loop" else "nowhere")
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(out)]) == 2
    assert f"--out-dir {out} is a {'symbolic link that loops' if what == 'loop' else 'broken symbolic link'}" in one_error(capsys)
    assert not (tmp_path / "nowhere").exists()


def test_train_resume_names_a_folder_where_the_state_should_be(text, tmp_path, capsys):
    out = tmp_path / "out"
    (out / checkpoint.TRAIN_STATE).mkdir(parents=True)
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(out), "--resume"]) == 2
    assert f"Cannot resume: {out / checkpoint.TRAIN_STATE} is a folder, not a file" in one_error(capsys)


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot write to: a read-only one, or, where modes do not stop it (root), /sys."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for folder in (locked, Path("/sys")):
        try:
            (folder / "probe").touch()
        except OSError:
            return folder
        (folder / "probe").unlink()
    pytest.skip("no folder on this machine refuses this process's writes")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_train_names_an_out_dir_under_proc(text, capsys):
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", "/proc/x"]) == 2
    assert one_error(capsys) == ("error: --out-dir /proc/x cannot be created: /proc does not take new files (No such file or "
                                 "directory); pass a directory you can write to.")


@pytest.mark.parametrize("exists", [False, True], ids=["new folder", "existing folder"])
def test_train_names_an_out_dir_it_cannot_write(exists, unwritable, text, capsys):
    out = unwritable if exists else unwritable / "out"
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(out)]) == 2
    said = f"--out-dir {out} does not take new files" if exists else f"--out-dir {out} cannot be created: {unwritable} does not"
    assert one_error(capsys).startswith(f"error: {said}")
    assert not (unwritable / "out").exists() and not (unwritable / "tokens").exists()


def test_train_names_a_token_cache_it_cannot_write(unwritable, text, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokens").symlink_to(unwritable)  # a cache folder this process may not write in, as another user's would be
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(out)]) == 2
    assert one_error(capsys).startswith(f"error: The token cache {out / 'tokens'} does not take new files (")
    assert [p.name for p in out.iterdir()] == ["tokens"]


@pytest.fixture
def fp32(tmp_path) -> Path:
    ckpt = tmp_path / "ckpt"
    checkpoint.save_model(ckpt, GPT(tiny_config()), {"name": "bytes"}, {}, step=0)
    return ckpt


@pytest.mark.parametrize("where", ["unwritable", "/proc"])
def test_quantize_names_an_out_it_cannot_write(where, fp32, tmp_path, capsys, request):
    parent = request.getfixturevalue("unwritable") if where == "unwritable" else Path("/proc")
    if not parent.is_dir():
        pytest.skip("needs Linux's /proc")
    out = parent / "int8"
    assert quantize_cli.main(["--ckpt", str(fp32), "--out", str(out), "--gen-tokens", "2", "--repeats", "1"]) == 2
    assert one_error(capsys).startswith(f"error: --out {out} cannot be created: {parent} does not take new files (")
    assert not out.exists()


def test_quantize_names_a_ckpt_or_an_out_that_is_a_symbolic_link_loop(fp32, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    assert quantize_cli.main(["--ckpt", str(loop)]) == 2
    assert one_error(capsys).startswith(f"error: {loop} is a symbolic link that loops")
    assert quantize_cli.main(["--ckpt", str(fp32), "--out", str(loop)]) == 2
    assert one_error(capsys).startswith(f"error: --out {loop} is a symbolic link that loops")


def test_app_refuses_a_port_out_of_range(fp32, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["app.py", "--ckpt", str(fp32), "--no-train", "--port", "99999"])
    with pytest.raises(SystemExit) as exited:
        app_cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "app.py: error: --port must be from 1 to 65535, got 99999."


def test_generate_refuses_samples_that_cannot_fit_before_decoding_any(fp32, capsys, monkeypatch):
    monkeypatch.setattr(generate_cli, "stream", lambda *a, **k: pytest.fail("decoding started"))
    assert generate_cli.main(["--ckpt", str(fp32), "--prompt", "hi", "--num-samples", "100000000"]) == 2
    error = one_error(capsys)
    assert re.match(r"error: 100,000,000 samples of 200 new tokens need about [\d,.]+ GB of memory, more than this "
                    r"machine's [\d,.]+ GB: ask for at most [\d,]+ samples\.$", error), error


def test_generate_refuses_new_tokens_whose_text_cannot_fit(fp32, capsys, monkeypatch):
    monkeypatch.setattr(generate_cli, "stream", lambda *a, **k: pytest.fail("decoding started"))
    assert generate_cli.main(["--ckpt", str(fp32), "--prompt", "hi", "--max-new-tokens", "1000000000000"]) == 2
    error = one_error(capsys)
    assert re.match(r"error: 1 sample of 1,000,000,000,000 new tokens needs about 24,000.0 GB of memory, more than this "
                    r"machine's [\d,.]+ GB: ask for at most [\d,]+ new tokens\.$", error), error


def test_the_most_generate_says_fits_does_fit_and_one_more_does_not(monkeypatch):
    """On a machine of a given memory: the number a refusal names passes the same check, and one more does not."""
    config = tiny_config()
    monkeypatch.setattr(config_module, "machine_memory", lambda: memory_needed(config) + 10 * sequence_memory(config))
    check_generation(config, 11, 0)  # the model and eleven sequences' caches fit exactly
    for samples, new_tokens, what in [(12, 100, "samples"), (2, 10**9, "new tokens"), (1, 10**9, "new tokens")]:
        with pytest.raises(ValueError) as refused:
            check_generation(config, samples, new_tokens)
        most = int(re.search(rf"ask for at most ([\d,]+) {what}\.$", str(refused.value)).group(1).replace(",", ""))
        fits = (most, new_tokens) if what == "samples" else (samples, most)
        check_generation(config, *fits)
        with pytest.raises(ValueError):
            check_generation(config, *(fits[0] + 1, fits[1]) if what == "samples" else (fits[0], fits[1] + 1))


def test_generate_on_a_small_machine_refuses_what_would_not_fit(fp32, capsys, monkeypatch):
    """The CLI asks the check with its flags: 3 samples fit on a machine of 3 sequences, 4 are refused."""
    config = tiny_config()
    monkeypatch.setattr(config_module, "machine_memory", lambda: memory_needed(config) + 2 * sequence_memory(config) + 10**4)
    assert generate_cli.main(["--ckpt", str(fp32), "--prompt", "hi", "--num-samples", "3", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert generate_cli.main(["--ckpt", str(fp32), "--prompt", "hi", "--num-samples", "4", "--max-new-tokens", "2"]) == 2
    assert one_error(capsys).endswith("ask for at most 3 samples.")


def test_interactive_set_refuses_what_cannot_fit_and_keeps_the_setting(fp32, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/set num_samples 100000000\n/set max_new_tokens 1000000000000\n/settings\n"))
    assert generate_cli.main(["--ckpt", str(fp32)]) == 0
    out = capsys.readouterr().out
    assert "error: 100,000,000 samples of 200 new tokens need about" in out
    assert "error: 1 sample of 1,000,000,000,000 new tokens needs about" in out
    assert "num_samples = 1\n" in out and "max_new_tokens = 200\n" in out


def without_root_override(cmd: list[str]) -> list[str]:
    """cmd as a process that file modes bind: as root, run through capsh without CAP_DAC_OVERRIDE (Debian's libcap2-bin)."""
    if os.geteuid() != 0:
        return cmd
    capsh = shutil.which("capsh") or "/usr/sbin/capsh"
    assert Path(capsh).is_file(), "as root this test needs capsh (Debian's libcap2-bin) to drop CAP_DAC_OVERRIDE"
    return [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(cmd)]


def test_quantize_names_an_earlier_out_in_a_folder_it_cannot_write(fp32, tmp_path):
    """An int8 folder quantize.py would replace, in a read-only folder: its new copy cannot be built beside it."""
    folder, out = tmp_path / "read-only", tmp_path / "read-only" / "int8"
    out.mkdir(parents=True)
    (out / checkpoint.CONFIG).write_text(json.dumps({"kind": "int8"}))  # an earlier quantize.py output, as check_out sees it
    folder.chmod(0o555)
    cmd = [sys.executable, str(ROOT / "quantize.py"), "--ckpt", str(fp32), "--out", str(out), "--gen-tokens", "2", "--repeats", "1"]
    done = subprocess.run(without_root_override(cmd), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --out {out} cannot be replaced: {folder} does not take new files (")
    assert [p.name for p in folder.iterdir()] == ["int8"]
