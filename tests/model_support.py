"""A tiny random GPT shared by the generation and trace tests."""

from __future__ import annotations

import torch

from model.config import GPTConfig
from model.gpt import GPT


def tiny_gpt(vocab: int = 101, block: int = 32, seed: int = 0, **variant) -> GPT:
    """A tiny random GPT with large weights, so that its greedy output depends on the context (not one token forever);
    variant: GPTConfig's block options (rotary, mlp, qk_norm)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, **variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model
