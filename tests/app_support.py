"""Helpers shared by the app tests: a tiny random int8 checkpoint, a free port, an in-process server, tiny trainer flags."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from model.config import GPTConfig  # noqa: E402
from model.formats.checkpoint import read_config, save_config, save_weights, write_json  # noqa: E402
from model.formats.int8 import quantize_model, save_int8  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.tokenizer import Tokenizer, padded_vocab_size  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")  # Debian's, driven by Playwright in the browser tests
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# A browser test module says: pytestmark = BROWSER_TEST (slow; skipped, with the reason, where chromium is missing).
BROWSER_TEST = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"),
]
REPORT = {"params": 3_300_000, "size_int8_bytes": 3_400_000, "val_nats_per_char_int8": 1.234}
# train.py flags for the Train tab's tests: a 1-layer, 32-wide model over bytes starts, trains and evaluates in seconds.
TINY_TRAIN = ("--preset", "tiny", "--tokenizer", "bytes", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
              "--block-size", "16", "--batch-size", "4", "--eval-interval", "10", "--eval-windows", "4",
              "--log-interval", "5", "--dtype", "fp32", "--device", "cpu")


def tiny_checkpoint(out_dir: Path, tokenizer: Tokenizer, block_size: int = 64) -> Path:
    """A random-weight tiny GPT with the gpt2 vocabulary, saved fp32 then int8 (out_dir/int8, with a report.json)."""
    torch.manual_seed(0)
    config = GPTConfig.from_name("tiny")
    config.vocab_size = padded_vocab_size(tokenizer.n_vocab)
    config.block_size = block_size
    model = GPT(config).eval()
    fp32, int8 = out_dir / "fp32", out_dir / "int8"
    save_weights(fp32 / "model.safetensors", model)
    save_config(fp32, config, tokenizer.spec)
    save_int8(int8, quantize_model(model), read_config(fp32))
    write_json(int8 / "report.json", REPORT)
    return int8


def stop(proc: subprocess.Popen) -> None:
    """End a served app started by a test: SIGTERM, then SIGKILL if it has not exited within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(ckpt: Path, visitors=None, seeded_alone: bool = True) -> Iterator[tuple[str, object]]:
    """The app on a free localhost port, in this process, with a Train tab backed by visitors (default: Visitors with
    the app's defaults, none started), seeded requests decoded alone unless seeded_alone is False: yields (url, pool);
    after, deletes the trained models and restores torch's thread count."""
    from model.webapp.pool import ModelPool
    from model.webapp.server import launch
    from model.webapp.visitors import Visitors

    threads = torch.get_num_threads()
    pool = ModelPool(ckpt, seeded_alone=seeded_alone)
    visitors = visitors if visitors is not None else Visitors()
    port = free_port()
    demo = launch(pool, host="127.0.0.1", port=port, prevent_thread_lock=True, visitors=visitors)
    try:
        yield f"http://127.0.0.1:{port}/", pool
    finally:
        demo.close()
        visitors.close()
        torch.set_num_threads(threads)
