"""A small GPT kit: model, tokenizer, data, training, quantization and generation for one text file."""

from .config import GPTConfig
from .gpt import GPT
from .load import Loaded, load
from .settings import PRESETS, preset
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["GPT", "GPTConfig", "PRESETS", "preset", "Loaded", "load", "Tokenizer", "load_tokenizer"]
