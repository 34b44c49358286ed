"""Train a small GPT on one text file: python train.py [--data input.txt] [--out-dir out] [...]; see --help."""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the --max-minutes budget counts from here, before the slow imports

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from model.checkpoint import CheckpointError  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.data import DataError  # noqa: E402
from model.distributed import PeerError  # noqa: E402
from model.tokenizer import TokenizerError  # noqa: E402
from model.trainer import FINETUNE_DEFAULTS, PRESET_DEFAULTS, ArgError, TrainArgs, TrainingDiverged, train  # noqa: E402

D = TrainArgs()


def parse_args(argv: list[str] | None = None) -> dict[str, object]:
    """The flags the user gave; every default is None here so the trainer can tell given flags from defaults."""
    p = argparse.ArgumentParser(
        description="Train a small GPT on one UTF-8 text file and write a checkpoint directory "
                    "(model.safetensors, config.json, metrics.json, train_state.pt, log.jsonl, loss.png).",
        epilog=f"Defaults shown are the 'cpu' preset's; other presets change some: {PRESET_DEFAULTS}. "
               f"With --init-from the defaults are {FINETUNE_DEFAULTS} and --block-size min(context, 256).",
        argument_default=None)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", help=f"training text, UTF-8; the last 10%% is the validation split (default {D.data})")
    g.add_argument("--out-dir", help=f"checkpoint directory; the token cache goes in OUT/tokens (default {D.out_dir})")
    g.add_argument("--tokenizer", help=f"tokenizer of a new model: gpt2-compact, gpt2 or bytes (default {D.tokenizer})")
    g.add_argument("--vocab-min-count", type=int, help="gpt2-compact keeps the GPT-2 tokens the training split uses at least "
                                                       f"this often, plus their BPE pieces and the 256 bytes (default {D.vocab_min_count})")
    g = p.add_argument_group("model (a new model; --init-from and --resume take the checkpoint's shape)")
    g.add_argument("--preset", choices=list(PRESETS), help=f"model shape (default {D.preset})")
    g.add_argument("--init-from", metavar="DIR", help="finetune the model of this checkpoint directory (its config and tokenizer)")
    g.add_argument("--n-layer", type=int, help="override the preset's number of layers")
    g.add_argument("--n-head", type=int, help="override the preset's number of attention heads")
    g.add_argument("--n-embd", type=int, help="override the preset's width (a multiple of --n-head)")
    g.add_argument("--block-size", type=int, help="training window in tokens (default: the preset's context, at most that)")
    g.add_argument("--dropout", type=float, help="dropout probability (default: the preset's, 0 for --init-from)")
    g = p.add_argument_group("schedule and optimizer")
    g.add_argument("--max-iters", type=int, help=f"optimizer steps at most (default {D.max_iters})")
    g.add_argument("--max-minutes", type=float, help=f"total wall-clock budget in minutes, final evaluation included; the LR "
                                                     f"cosine ends exactly at the budget; 0 = none (default {D.max_minutes:g})")
    g.add_argument("--batch-size", type=int, help=f"sequences per micro-batch, per process under torchrun (default {D.batch_size})")
    g.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step, all processes together: under torchrun "
                                                  f"a multiple of the process count, split among them (default {D.grad_accum}, "
                                                  "under torchrun the process count: one micro-batch per process)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {D.lr:g})")
    g.add_argument("--min-lr", type=float, help=f"learning rate at the end of the cosine decay (default {D.min_lr:g})")
    g.add_argument("--warmup-iters", type=int, help=f"steps of linear warmup (default {D.warmup_iters})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay of matrices and embeddings (default {D.weight_decay:g})")
    g.add_argument("--beta1", type=float, help=f"AdamW beta1 (default {D.beta1:g})")
    g.add_argument("--beta2", type=float, help=f"AdamW beta2 (default {D.beta2:g})")
    g.add_argument("--grad-clip", type=float, help=f"clip gradients to this global norm, 0 = off (default {D.grad_clip:g})")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, help=f"evaluate (and keep the best weights) every N steps (default {D.eval_interval})")
    g.add_argument("--eval-windows", type=int, help="each evaluation scores the whole validation split when it has at most this "
                                                    "many windows of the model's context, else this many evenly spaced ones "
                                                    f"(default {D.eval_windows})")
    g.add_argument("--log-interval", type=int, help=f"write a train-loss record to log.jsonl every N steps (default {D.log_interval})")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help=f"random seed of the initial weights and of the batches (default {D.seed})")
    g.add_argument("--device", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N (default auto)")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision: auto = bf16 on CUDA and on CPUs with native bf16, else fp32; fp16 is CUDA-only")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores); on a busy shared CPU, 1 can be much faster")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    g.add_argument("--dist-timeout", type=float, help="torchrun: minutes a process waits for a silent peer before the run "
                                                      f"fails with an error (default {D.dist_timeout:g})")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir exactly where it stopped; "
                                                         "flags given now override the saved ones (not the model shape)")
    ns = p.parse_args(argv)
    given = vars(ns)
    for flag in ("compile", "resume"):
        given[flag] = given[flag] or None
    return given


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
    if result.get("failed"):  # under torchrun, a rank other than 0 whose run rank 0 found diverged
        return 1
    return 130 if result.get("interrupted") else 0  # stopped early (state saved for --resume): not a finished run


if __name__ == "__main__":
    sys.exit(main(t_start=T_START))
