"""Plots: loss.png of a training run, and the one way every figure of the kit is written (atomically, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from model import atomic  # noqa: E402


def plot_losses(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Plot train loss and val nats/token (left) and val nats/char (right) against step; written atomically.

    A record marked final (the best weights on the whole split, as in metrics.json) is the last point, a star.
    """
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [r for r in records if "val_nats_per_token" in r and not r.get("final")]
    final = next((r for r in reversed(records) if r.get("final")), None)
    fig, (ax_tok, ax_char) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_tok.plot(*zip(*train, strict=True), label="train (nats/token)", alpha=0.7)
    if val:
        steps = [r["step"] for r in val]
        ax_tok.plot(steps, [r["val_nats_per_token"] for r in val], "o-", label="val (nats/token)")
        ax_char.plot(steps, [r["val_nats_per_char"] for r in val], "o-", color="C2", label="val (nats/char)")
    if final:
        label = f"final: best weights (step {final['best_step']})"
        ax_tok.plot([final["step"]], [final["val_nats_per_token"]], "*", ms=12, color="C3", label=label)
        ax_char.plot([final["step"]], [final["val_nats_per_char"]], "*", ms=12, color="C3", label=label)
    ax_tok.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title or "loss")
    ax_char.set(xlabel="step", ylabel="nats/char", title="validation, tokenizer-independent")
    for ax in (ax_tok, ax_char):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Lay out, write atomically as PNG (a reader never sees half a file) and close a matplotlib figure."""
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
