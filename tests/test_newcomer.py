"""The README's newcomer path, offline: a copy of the project alone (no ../shared, no tiktoken cache, no flags but a
short run) trains on the committed input.txt, quantizes, generates and serves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_support import free_port, stop
from gradio_client import Client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    """The files a clone would hold, as they are in the working tree: tracked ones plus new, not ignored ones."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]  # not files deleted since


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run `python ARGS` in cwd; its stdout, after checking it succeeded."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"python {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def connect(url: str, proc: subprocess.Popen, timeout: float) -> Client:
    """A gradio_client Client of the app at url, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"app.py exited {proc.returncode}"
        try:
            return Client(url, verbose=False)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_fresh_copy_trains_quantizes_generates_and_serves(tmp_path):
    project = tmp_path / "smallgpt"
    for name in project_files():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    assert (project / "input.txt").is_file() and (project / "model" / "gpt2.tiktoken").is_file()
    assert not (project.parent / "shared").exists()
    empty_tmp, empty_cache = tmp_path / "tmp", tmp_path / "data-gym-cache"
    empty_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "SMALLGPT_CKPT", "PYTHONPATH")}
    env.update(DATA_GYM_CACHE_DIR=str(empty_cache), TMPDIR=str(empty_tmp), GRADIO_ANALYTICS_ENABLED="False")

    out = run(["train.py", "--max-minutes", "0.5"], project, env, timeout=300)
    assert (project / "out" / "model.safetensors").is_file() and (project / "out" / "metrics.json").is_file(), out
    out = run(["quantize.py"], project, env, timeout=300)
    assert (project / "out" / "int8" / "model.safetensors").is_file() and "val_nats_per_char" in out, out
    out = run(["generate.py", "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"], project, env, timeout=120)
    assert out.startswith("ROMEO:") and len(out.strip()) > len("ROMEO:"), out

    port = free_port()
    log = open(tmp_path / "app.log", "w")  # a file, not a pipe nobody reads: a chatty app can never block on it
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=project, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        client = connect(f"http://127.0.0.1:{port}/", proc, timeout=120)
        texts = client.predict(prompt="ROMEO:", max_new_tokens=10, num_sequences=1, seed=1, api_name="/generate")
        assert texts[0].strip(), texts
    finally:
        stop(proc)
        log.close()
    assert not empty_cache.exists()  # no step read or wrote a tiktoken cache
