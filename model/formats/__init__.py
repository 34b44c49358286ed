"""Checkpoints and formats: our safetensors folders, int8, Hugging Face import and export, loading any of them."""
