"""Helpers shared by the app tests: a tiny random int8 checkpoint, a free port, an in-process server."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

from model.checkpoint import read_config, save_config, save_weights, write_json  # noqa: E402
from model.config import preset  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.quantize import quantize_model, save_int8  # noqa: E402
from model.tokenizer import Tokenizer, padded_vocab_size  # noqa: E402

REPORT = {"params": 3_300_000, "size_int8_bytes": 3_400_000, "val_nats_per_char_int8": 1.234}


def tiny_checkpoint(out_dir: Path, tokenizer: Tokenizer, block_size: int = 64) -> Path:
    """A random-weight tiny GPT with the gpt2 vocabulary, saved fp32 then int8 (out_dir/int8, with a report.json)."""
    torch.manual_seed(0)
    config = preset("tiny")
    config.vocab_size = padded_vocab_size(tokenizer.n_vocab)
    config.block_size = block_size
    model = GPT(config).eval()
    fp32, int8 = out_dir / "fp32", out_dir / "int8"
    save_weights(fp32 / "model.safetensors", model)
    save_config(fp32, config, tokenizer.spec)
    save_int8(int8, quantize_model(model), read_config(fp32))
    write_json(int8 / "report.json", REPORT)
    return int8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(ckpt: Path) -> Iterator[tuple[str, object]]:
    """The app on a free localhost port, in this process: yields (url, pool); restores torch's thread count after."""
    from model.webapp import ModelPool, launch

    threads = torch.get_num_threads()
    pool = ModelPool(ckpt)
    port = free_port()
    demo = launch(pool, host="127.0.0.1", port=port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/", pool
    finally:
        demo.close()
        torch.set_num_threads(threads)
