"""Export any checkpoint folder of this kit (fp32) or a Hugging Face GPT-2 folder as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from model.formats.checkpoint import CheckpointError, read_config
from model.formats.hf import export_hf, is_hf_dir
from model.formats.load import load


def export_checkpoint(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Export a checkpoint directory (ours in fp32, or a Hugging Face GPT-2) as a Hugging Face directory (export_hf); int8 is refused."""
    if Path(ckpt).resolve() == Path(out_dir).resolve():
        raise CheckpointError(f"--out {out_dir} is the checkpoint itself; export to another directory.")
    kind = "fp32" if is_hf_dir(ckpt) else read_config(ckpt).get("kind", "fp32")
    if kind != "fp32":
        raise CheckpointError(f"{ckpt} is an {kind} checkpoint; export the fp32 checkpoint it was quantized from instead.")
    loaded = load(ckpt)
    return export_hf(loaded.model, loaded.tokenizer, out_dir)
