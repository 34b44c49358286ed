"""Shared test fixtures: the offline GPT-2 vocabulary and Tiny Shakespeare from ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TINY_SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
TIKTOKEN_CACHE = SHARED / "tiktoken-cache"

if "TIKTOKEN_CACHE_DIR" not in os.environ and TIKTOKEN_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2 BPE, loaded offline; skips (with the reason) when no cached vocabulary is available."""
    from model.tokenizer import TokenizerError, gpt2

    try:
        return gpt2()
    except TokenizerError as e:
        pytest.skip(f"GPT-2 vocabulary unavailable offline: {e}")


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    if not TINY_SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {TINY_SHAKESPEARE} (the ../shared folder beside the project)")
    return TINY_SHAKESPEARE


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two threads of a busy 2-core machine.
    A module that wants it for every test says: pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
