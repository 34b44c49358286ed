"""The Space export: a self-contained folder whose app.py boots with no flags and answers a gradio_client request."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gradio
import pytest
from app_support import free_port, tiny_checkpoint
from gradio_client import Client

from model.formats.checkpoint import CheckpointError
from model.webapp.space import MARKER, PACKAGE, export_space, torch_version

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def space(tmp_path_factory, gpt2_tokenizer) -> Path:
    tmp = tmp_path_factory.mktemp("space")
    return export_space(tiny_checkpoint(tmp, gpt2_tokenizer), tmp / "space", app_file=ROOT / "app.py")


def test_bundle_holds_everything_it_needs(space):
    names = {p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file()}
    assert {"app.py", "README.md", "requirements.txt", "model/gpt2.tiktoken",  # GPT-2's vocabulary: the Space starts offline
            "train.py", "quantize.py", "input.txt",  # what the Train tab runs, and its bundled text
            "out/int8/config.json", "out/int8/model.safetensors", "out/int8/report.json"} <= names
    assert {f"model/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")} <= names  # the whole package
    assert not any("__pycache__" in n for n in names)
    readme = (space / "README.md").read_text(encoding="utf-8")
    front = readme.split("---")[1]
    for line in ["sdk: gradio", f"sdk_version: {gradio.__version__}", "app_file: app.py", 'python_version: "3.11"',
                 "suggested_hardware: cpu-basic", "title: smallgpt", "emoji: "]:
        assert line in front, line
    reqs = (space / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert f"torch=={torch_version()}" in reqs and f"gradio=={gradio.__version__}" in reqs


def test_export_replaces_an_earlier_export_but_no_other_folder(space, tmp_path):
    (space / "stale.txt").write_text("old", encoding="utf-8")
    export_space(space / "out" / "int8", tmp_path / "again", app_file=ROOT / "app.py")  # from a bundled checkpoint
    assert export_space(tmp_path / "again" / "out" / "int8", space, app_file=ROOT / "app.py") == space
    assert (space / MARKER).is_file() and not (space / "stale.txt").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not an earlier Space export"):
        export_space(space / "out" / "int8", other, app_file=ROOT / "app.py")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    with pytest.raises(CheckpointError, match="python train.py then python quantize.py"):
        export_space(tmp_path / "missing", tmp_path / "new", app_file=ROOT / "app.py")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_exported_folder_boots_and_answers(space):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "SMALLGPT_CKPT", "PYTHONPATH")}
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                client = Client(url, verbose=False)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        out = client.predict(prompt="Hello from the Space", max_new_tokens=5, seed=1, api_name="/generate")
        assert sum(bool(s) for s in out) == 3
        # The Train tab works there: train on the bundled text until a first sample, stop, get the int8 model, use it.
        st = client.predict(source="shakespeare", minutes=1, api_name="/train_start")
        while st["state"] == "running" and not st.get("sample"):
            time.sleep(1)
            st = client.predict(api_name="/train_status")
        client.predict(api_name="/train_stop")
        while (st := client.predict(api_name="/train_status"))["state"] in ("running", "quantizing"):
            time.sleep(1)
        assert st["state"] == "stopped" and st["report"], st
        assert "Parameters" in client.predict(model="yours", api_name="/use_model")
        out = client.predict(prompt="ROMEO:", max_new_tokens=5, seed=1, api_name="/generate")
        assert sum(bool(s) for s in out) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
