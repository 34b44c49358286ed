"""Shared test fixtures: GPT-2's BPE from the packaged vocabulary and Tiny Shakespeare, the committed input.txt."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = ROOT / "input.txt"  # the default corpus, committed
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2 BPE, built offline from model/gpt2.tiktoken."""
    from model.tokenizer import gpt2

    return gpt2()


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Tiny Shakespeare (1,115,394 characters), the committed input.txt; skips if a user replaced it with their own text."""
    if hashlib.sha256(TINY_SHAKESPEARE.read_bytes()).hexdigest() != TINY_SHAKESPEARE_SHA256:
        pytest.skip(f"{TINY_SHAKESPEARE} is not the committed Tiny Shakespeare (git checkout input.txt restores it)")
    return TINY_SHAKESPEARE


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two threads of a busy 2-core machine.
    A module that wants it for every test says: pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
