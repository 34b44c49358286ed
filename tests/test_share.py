"""python app.py --share where the share link cannot be made (here: no internet, so Gradio cannot download its tunnel
program): one sentence says so and why, the app keeps serving locally, and Ctrl-C still exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from app_support import free_port, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_share_offline_says_why_in_one_sentence_and_keeps_serving(tmp_path, gpt2_tokenizer):
    ckpt = tiny_checkpoint(tmp_path, gpt2_tokenizer)
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--ckpt", str(ckpt), "--share", "--port", str(port), "--no-train"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []  # the app's output, read by a thread so that a missing line fails the test instead of hanging it

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("No share link") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        said = next(line for line in lines if line.startswith("No share link"))
        assert said.count(". ") == 0 and said.rstrip().endswith(f"http://127.0.0.1:{port}/."), said
        assert "tunnel" in said and "offline" in said
        assert not any("Could not create share link" in line for line in lines), "".join(lines)  # not Gradio's page of advice
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:  # still served locally
            assert page.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
