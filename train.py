"""Train a small GPT on one text file: python train.py [--data input.txt] [--out-dir out] [...]; see --help."""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the --max-minutes budget counts from here, before the slow imports

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from model.formats.checkpoint import CheckpointError  # noqa: E402
from model.tokenizer import TokenizerError  # noqa: E402
from model.training.data import DataError  # noqa: E402
from model.training.distributed import PeerError  # noqa: E402
from model.training.rounds import train  # noqa: E402
from model.training.settings import FINETUNE, PRESETS, ArgError, add_arguments  # noqa: E402
from model.training.trainer import TrainingDiverged  # noqa: E402


def parse_args(argv: list[str] | None = None) -> dict[str, object]:
    """The flags the user gave, and only those, so the run can tell them from the defaults (model/training/settings.py)."""
    p = argparse.ArgumentParser(
        description="Train a small GPT on one UTF-8 text file and write a checkpoint directory "
                    "(model.safetensors, config.json, metrics.json, train_state.pt, log.jsonl, loss.png).",
        epilog=f"Defaults shown hold for every preset unless it changes them: {PRESETS}. With --init-from the defaults "
               f"are {FINETUNE}.")
    add_arguments(p)
    return vars(p.parse_args(argv))


def main(argv: list[str] | None = None, t_start: float | None = None) -> int:
    """Run train.py; t_start is when the time budget began (None: now). Returns the exit status."""
    # A parent that ignores SIGINT (a script's `cmd &`) passes that on: Ctrl-C, or the app's Stop, must still stop cleanly.
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        signal.signal(signal.SIGINT, signal.default_int_handler)
    given = parse_args(argv)
    try:
        result = train(given, t_start=t_start)
    except (ArgError, DataError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (PeerError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result.failed:  # under torchrun, a rank other than 0 whose run rank 0 found diverged
        return 1
    return 130 if result.interrupted else 0  # stopped early (state saved for --resume): not a finished run


if __name__ == "__main__":
    sys.exit(main(t_start=T_START))
