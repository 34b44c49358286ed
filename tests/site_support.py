"""Helpers shared by the static-site tests: a small model trained in seconds, the texts the tokenizer parity is checked on,
what every exported site folder holds."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from model.config import GPTConfig
from model.formats.checkpoint import save_config, save_weights
from model.gpt import GPT
from model.tokenizer import Tokenizer, padded_vocab_size

# Text the vocabulary was not built from: accents, CJK, emoji (with a skin tone, several bytes a character), code,
# CRLF line ends, runs of spaces, and the special token's text, which must be plain text.
ODD_TEXTS = (
    "Ça va? Voilà — naïve café, señor; Größe, ½ ∞ ≠ ≤",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "emoji 🤖👍🏽🇫🇷 and 👨‍👩‍👧 family",
    "def f(x):\r\n\treturn {'a': x ** 2}  # ok\r\n\r\n    if x != 0:  pass\n",
    "trailing spaces   \n\n\n  and tabs\t\t\nEnd.   ",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> <|endoftext",
    "I'll we've they're it's DON'T 1234567 3.14159 $100",
)


# What every site folder holds: the page, its model, its tokenizer and the runtime copied in (the layout transformers.js loads).
SITE_FILES = ("index.html", "app.js", "style.css", "tokenizer.json", "tokenizer_config.json", "smallgpt.json",
              "onnx/model.onnx", "onnx/model_quantized.onnx", "vendor/ort.wasm.min.mjs", "vendor/ort-wasm-simd-threaded.wasm",
              "vendor/ort-wasm-simd-threaded.mjs", "vendor/tokenizers.min.mjs", "vendor/VERSIONS.txt")


def check_site_folder(folder: Path) -> None:
    """Assert that folder is a whole site: a Hugging Face static Space's front matter, every file of SITE_FILES, and a
    page that names no URL of another host."""
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^---\n(.*\n)*sdk: static\n(.*\n)*app_file: index\.html\n(.*\n)*---\n", readme)
    for name in SITE_FILES:
        assert (folder / name).is_file(), name
    page = (folder / "index.html").read_text(encoding="utf-8") + (folder / "app.js").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["'](https?:)?//|fetch\(["']https?:|import .* from ["']https?:""", page)


def train_small(tokenizer: Tokenizer, ids: list[int], out_dir: Path, steps: int = 100, seed: int = 0, **shape) -> GPT:
    """A 2-layer, 64-wide rotary GPT (context 64) trained for `steps` AdamW steps on ids, saved as an fp32 checkpoint
    in out_dir: a model whose greedy text and int8 loss mean something, made in seconds."""
    torch.manual_seed(seed)
    config = GPTConfig(**{"block_size": 64, "vocab_size": padded_vocab_size(tokenizer.n_vocab), "n_layer": 2,
                          "n_head": 2, "n_embd": 64, "rotary": True, **shape})
    model = GPT(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread, far faster than on a busy machine's two
    try:
        data = torch.tensor(ids, dtype=torch.long)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        block = config.block_size
        for _ in range(steps):
            starts = torch.randint(0, len(data) - block - 1, (16,), generator=g)
            x = torch.stack([data[s:s + block] for s in starts])
            y = torch.stack([data[s + 1:s + block + 1] for s in starts])
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    save_weights(out_dir / "model.safetensors", model)
    save_config(out_dir, config, tokenizer.spec)
    return model
