"""Checkpoint I/O: weights round trip to identical logits, the resume state never unpickles objects, writes are atomic,
leave no stale temp files, get the file mode open() gives, and damaged values (wrong dtype, NaN) are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_support import TEXT, tiny_config

import generate as generate_cli
import quantize as quantize_cli
import train as train_cli
from model import atomic
from model.formats import checkpoint
from model.formats.checkpoint import CheckpointError
from model.gpt import GPT
from model.training.trainer import train


def test_weights_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    checkpoint.save_weights(tmp_path / checkpoint.WEIGHTS, model)
    checkpoint.save_config(tmp_path, model.config, {"name": "bytes"}, {"lr": 0.1})
    assert checkpoint.TIED_KEY not in load_file(tmp_path / checkpoint.WEIGHTS)  # the tied head is stored once
    loaded, cfg = checkpoint.load_fp32(tmp_path)
    assert cfg["train"] == {"lr": 0.1} and cfg["tokenizer"] == {"name": "bytes"}
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(x)[0], loaded(x)[0])


def test_weights_of_another_shape_are_refused(tmp_path):
    checkpoint.save_weights(tmp_path / checkpoint.WEIGHTS, GPT(tiny_config()))
    checkpoint.save_config(tmp_path, tiny_config(n_embd=64), {"name": "bytes"})
    with pytest.raises(CheckpointError, match="do not match its config"):
        checkpoint.load_fp32(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint at"):
        checkpoint.load_fp32(tmp_path / "nope")
    checkpoint.save_config(tmp_path, tiny_config(), {"name": "bytes"})
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load_fp32(tmp_path)
    (tmp_path / checkpoint.WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        checkpoint.load_fp32(tmp_path)


def test_train_state_round_trip(tmp_path):
    model = GPT(tiny_config())
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    state = {"step": 3, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "t": None}
    checkpoint.save_train_state(tmp_path / "s.pt", state)
    back = checkpoint.load_train_state(tmp_path / "s.pt")
    assert back["step"] == 3 and back["t"] is None
    assert torch.equal(back["rng"], state["rng"])
    torch.optim.AdamW(model.parameters()).load_state_dict(back["optimizer"])


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').touch()",))


def test_train_state_never_unpickles_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"step": 1, "x": Evil()}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="damaged or not a training state"):
        checkpoint.load_train_state(tmp_path / "s.pt")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(CheckpointError, match="train without --resume first"):
        checkpoint.load_train_state(tmp_path / "missing.pt")


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def _plain_mode(folder: Path) -> int:
    """The permission bits a plain open() gives a new file in `folder` under the current umask."""
    probe = folder / "probe"
    with open(probe, "w"):
        pass
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    return mode


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_files_get_the_mode_open_gives(tmp_path, umask):
    before = os.umask(umask)
    try:
        model = GPT(tiny_config())
        checkpoint.save_weights(tmp_path / checkpoint.WEIGHTS, model)
        checkpoint.save_weights(tmp_path / checkpoint.WEIGHTS, model)  # a rewrite too: the replaced file must keep the mode
        checkpoint.save_config(tmp_path, model.config, {"name": "bytes"})
        checkpoint.write_json(tmp_path / checkpoint.METRICS, {"val": 1.0})
        checkpoint.save_train_state(tmp_path / checkpoint.TRAIN_STATE, {"step": 1})
        expected = _plain_mode(tmp_path)
    finally:
        os.umask(before)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys([checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.METRICS, checkpoint.TRAIN_STATE], oct(expected))


def test_saves_remove_stale_temp_files_of_what_they_write(tmp_path):
    """Leftovers of killed writes (.NAME.RANDOM.tmp) go when NAME is next written; other temp files and folders stay."""
    stale = [f".{name}.k1ll3d_x.tmp" for name in (checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.METRICS, checkpoint.TRAIN_STATE)]
    kept = [".log.jsonl.abc12345.tmp", ".config.abc12345.tmp", ".model.safetensors.old"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 1000)
    (tmp_path / ".int8.abc12345.tmp").mkdir()  # a quantize.py build under way in a subfolder of the trainer's folder
    model = GPT(tiny_config())
    checkpoint.save_weights(tmp_path / checkpoint.WEIGHTS, model)
    checkpoint.save_config(tmp_path, model.config, {"name": "bytes"})
    checkpoint.write_json(tmp_path / checkpoint.METRICS, {"val": 1.0})
    checkpoint.save_train_state(tmp_path / checkpoint.TRAIN_STATE, {"step": 1})
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.METRICS, checkpoint.TRAIN_STATE, ".int8.abc12345.tmp", *kept}


KILL_DURING_SAVE = """
import os, signal, sys
from model.formats import checkpoint
from model.gpt import GPT
from train_support import tiny_config
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # dies after the temp file is written, before the rename
checkpoint.save_weights(sys.argv[1], GPT(tiny_config()))
"""


def test_a_write_killed_by_sigkill_is_cleaned_by_the_next_save(tmp_path):
    target = tmp_path / checkpoint.WEIGHTS
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(target)], env=env, cwd=root, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists() and len(list(tmp_path.iterdir())) > 0  # what a kill leaves: temp file(s) only
    checkpoint.save_weights(target, GPT(tiny_config()))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.WEIGHTS]


KILL_DURING_WRITE = """
import os, signal, sys
from model import atomic, plot
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # dies after the temp file is written, before the rename
if sys.argv[1].endswith(".png"):
    import matplotlib.pyplot as plt
    plot.save_figure(plt.figure(), sys.argv[1])
else:
    atomic.write_text(sys.argv[1], "new")
"""


def _killed_write(target: Path) -> None:
    """Write target in a child process killed by SIGKILL just before its rename."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(target)], env=env, cwd=root, timeout=120)
    assert proc.returncode == -signal.SIGKILL


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_refused_resume_removes_what_a_killed_first_save_left(tmp_path):
    """A run killed during its first save leaves a temp of the weights and no train_state.pt: --resume is refused, and
    the temp goes."""
    temp = tmp_path / f".{checkpoint.WEIGHTS}.{_dead_pid()}-abcd1234.tmp"
    temp.write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match="train without --resume first"):
        checkpoint.load_train_state(tmp_path / checkpoint.TRAIN_STATE)
    assert list(tmp_path.iterdir()) == []


def test_every_writer_removes_what_a_killed_write_of_its_file_left(tmp_path):
    """log.jsonl (atomic.write_text) and loss.png (plot.save_figure), killed before their rename, leave a temp file each
    that the next write of the same file removes; temps of a running writer, or of other names, stay."""
    import matplotlib.pyplot as plt

    from model import plot

    log, png = tmp_path / "log.jsonl", tmp_path / "loss.png"
    for target in (log, png):
        _killed_write(target)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0].startswith(".log.jsonl.") and left[1].startswith(".loss.png."), left
    running = tmp_path / f".log.jsonl.{os.getppid()}-abcd1234.tmp"  # a write under way in another process
    other = tmp_path / f".log.jsonl.x.{os.getppid()}-abcd1234.tmp"
    running.write_text("x")
    other.write_text("x")
    atomic.write_text(log, "new")
    plot.save_figure(plt.figure(), png)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([log.name, png.name, running.name, other.name])
    assert log.read_text() == "new"


SMALL_RUN = ["--preset", "tiny", "--tokenizer", "bytes", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
             "--dtype", "fp32", "--device", "cpu", "--max-minutes", "0", "--eval-windows", "4", "--threads", "1"]
KILL_AFTER = """
import os, signal, sys
from model.formats import checkpoint
import train
name = sys.argv.pop(1)  # the checkpoint function at whose call the run is killed
setattr(checkpoint, name, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("kill_at", [pytest.param("save_config", marks=pytest.mark.slow), "save_train_state"])
def test_a_run_killed_during_its_first_save_leaves_no_file_of_other_weights(kill_at, tmp_path):
    """A second run of another shape into the folder of a finished one, killed -9 in its first save (between the weights
    and config.json, or right after both): every file left describes the new weights, or is gone."""
    text, out = tmp_path / "input.txt", tmp_path / "out"
    text.write_text(TEXT, encoding="utf-8")
    train({"data": str(text), "out_dir": str(out), "max_iters": 2, **_flags(SMALL_RUN)})
    assert (out / checkpoint.METRICS).is_file()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER, kill_at, *SMALL_RUN, "--data", str(text), "--out-dir", str(out),
                           "--n-layer", "1", "--n-embd", "64", "--max-iters", "2"],
                          env={**os.environ, "PYTHONPATH": str(root)}, cwd=root, timeout=300, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / checkpoint.METRICS).exists()
    new_state = load_file(out / checkpoint.WEIGHTS)
    assert new_state["transformer.wte.weight"].shape[1] == 64 and "transformer.h.1.ln_1.weight" not in new_state
    if kill_at == "save_config":  # the old config.json went before the new weights came
        assert not (out / checkpoint.CONFIG).exists()
        return
    model, _ = checkpoint.load_fp32(out)
    assert model.config.n_layer == 1 and model.config.n_embd == 64
    assert quantize_cli.main(["--ckpt", str(out), "--eval-windows", "1", "--gen-tokens", "2", "--repeats", "1"]) == 0
    assert not (out / "int8" / checkpoint.METRICS).exists()


def _flags(argv: list[str]) -> dict[str, object]:
    """The given settings of a train.py command line."""
    return train_cli.parse_args(argv)


def _damage(state: dict[str, torch.Tensor], how: str) -> None:
    if how == "int32":
        state["transformer.wte.weight"] = state["transformer.wte.weight"].to(torch.int32)
    elif how == "nan":
        state["transformer.ln_f.weight"][0] = float("nan")
    else:
        state["transformer.h.0.attn.c_attn.weight"][3, 4] = float("inf")


@pytest.mark.parametrize("how", ["int32", "nan", "inf"])
def test_non_float_or_non_finite_weights_are_refused(tmp_path, how, capsys):
    model = GPT(tiny_config())
    state = {k: v.clone() for k, v in model.state_dict().items() if k != checkpoint.TIED_KEY}
    _damage(state, how)
    save_file(state, str(tmp_path / checkpoint.WEIGHTS))
    checkpoint.save_config(tmp_path, model.config, {"name": "bytes"})
    with pytest.raises(CheckpointError, match="not floating point|NaN or infinite") as info:
        checkpoint.load_fp32(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError):  # the trainer's --resume and --init-from paths build the model the same way
        checkpoint.build_model(model.config, state, "train_state.pt")
    assert generate_cli.main(["--ckpt", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith("."), err


def test_atomic_dir_swaps_a_folder_whole(tmp_path):
    target = tmp_path / "int8"
    target.mkdir()
    (target / "a").write_text("old")
    (target / "b").write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as build:
        (build / "a").write_text("new")
        raise RuntimeError("killed")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "old", "b": "old"}
    with atomic.atomic_dir(target) as build:
        (build / "a").write_text("new")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]


def test_atomic_dir_recovers_from_a_kill_at_any_point(tmp_path):
    target, aside = tmp_path / "int8", tmp_path / ".int8.old"
    aside.mkdir()  # killed between renaming the old folder aside and the new one in: the old one is the current one
    (aside / "a").write_text("old")
    (tmp_path / ".int8.k1ll3d_x.tmp").mkdir()  # a build killed before its swap
    atomic.recover_dir(target)
    assert [p.name for p in tmp_path.iterdir()] == ["int8"] and (target / "a").read_text() == "old"
    aside.mkdir()  # killed while deleting the old folder, after the new one was in place
    atomic.recover_dir(target)
    assert [p.name for p in tmp_path.iterdir()] == ["int8"] and (target / "a").read_text() == "old"


def test_missing_folder_with_an_aside_copy_says_how_to_recover(tmp_path):
    (tmp_path / ".int8.old").mkdir()
    with pytest.raises(CheckpointError, match="interrupted"):
        checkpoint.read_config(tmp_path / "int8")


def _loop(path: Path) -> None:
    """Make path a symbolic link that leads back to itself."""
    path.symlink_to(path.name)


@pytest.mark.parametrize("what", ["folder", "loop", "broken link"])
@pytest.mark.parametrize("name", [checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.TRAIN_STATE, "DIR"])
def test_a_path_that_is_not_a_file_is_named_for_what_it_is(name, what, tmp_path):
    """A folder, a symbolic link loop or a broken link where a checkpoint file (or the folder) should be is called that,
    not "missing" or "does not exist"."""
    ckpt = tmp_path / "ckpt"
    model = GPT(tiny_config())
    checkpoint.save_model(ckpt, model, {"name": "bytes"}, {}, step=0)
    checkpoint.save_train_state(ckpt / checkpoint.TRAIN_STATE, {"step": 0})
    target = ckpt if name == "DIR" else ckpt / name
    if name == "DIR":
        ckpt, target = tmp_path / "link", tmp_path / "link"
    else:
        target.unlink()
    if what == "folder":
        if name == "DIR":
            target.write_text("x")
        else:
            target.mkdir()
    elif what == "loop":
        _loop(target)
    else:
        target.symlink_to("nowhere")
    expected = {"folder": "is a file, not a checkpoint directory" if name == "DIR" else "is a folder, not a file",
                "loop": "is a symbolic link that loops", "broken link": "is a broken symbolic link (to nowhere"}[what]
    with pytest.raises(CheckpointError) as info:
        if name == checkpoint.TRAIN_STATE:
            checkpoint.load_train_state(target)
        else:
            checkpoint.load_fp32(ckpt)
    message = str(info.value)
    assert f"{target} {expected}" in message and message.endswith(".") and "\n" not in message, message
    assert f"{target} is missing" not in message and f"{target} does not exist" not in message


def test_a_training_text_that_is_a_folder_is_called_one(tmp_path):
    from model.training.data import DataError, read_text

    (tmp_path / "text").mkdir()
    with pytest.raises(DataError, match="text is a folder, not a file: pass --data PATH"):
        read_text(tmp_path / "text")
    _loop(tmp_path / "loop.txt")
    with pytest.raises(DataError, match="loop.txt is a symbolic link that loops"):
        read_text(tmp_path / "loop.txt")


def test_a_resumed_run_stopped_after_a_new_best_leaves_no_metrics_of_the_old_one(tmp_path):
    """The issue's second case: a finished run resumed for more steps and stopped after a new best was saved."""
    text, out = tmp_path / "input.txt", tmp_path / "out"
    text.write_text(TEXT, encoding="utf-8")
    flags = {"data": str(text), "out_dir": str(out), "eval_interval": 2, "lr": 1e-2, **_flags(SMALL_RUN)}
    train({**flags, "max_iters": 2})
    assert checkpoint.read_json(out / checkpoint.METRICS)["best_step"] == 2
    train({**flags, "max_iters": 40, "resume": True}, stop_after=4)  # step 4 improves on step 2 at this learning rate
    assert checkpoint.weights_step(out / checkpoint.WEIGHTS) == 4
    assert not (out / checkpoint.METRICS).exists()
    assert checkpoint.read_metrics(out, checkpoint.load_fp32(out)[0]) is None
