"""A small GPT kit: model, tokenizer, data, training, quantization and generation for one text file."""

from model.config import GPTConfig
from model.formats.load import Loaded, load
from model.gpt import GPT
from model.tokenizer import Tokenizer, load_tokenizer
from model.training.settings import PRESETS

__all__ = ["GPT", "GPTConfig", "PRESETS", "Loaded", "load", "Tokenizer", "load_tokenizer"]
