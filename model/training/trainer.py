"""The training loop of a resolved plan (model/training/plan.py): the model and optimizer, the step loop, evaluation, early
stopping and checkpoints; the time budget and schedule are model/training/budget.py's.

Data-parallel under torchrun (see model/training/distributed.py): every rank draws the same global micro-batch and trains on its
own slice, the gradient accumulation micro-steps are split across ranks (all but the last under DDP's no_sync), rank 0
takes every clock-based decision for all, and only rank 0 evaluates, prints and writes (the methods marked "I/O").
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import atomic
from model.cpus import available_cpus, busy_elsewhere, default_threads
from model.formats import checkpoint
from model.formats.checkpoint import LOG, PLOT, CheckpointError, read_log
from model.generation.generate import SamplingConfig, generate
from model.gpt import GPT
from model.plot import plot_losses
from model.training import distributed
from model.training.budget import Budget
from model.training.data import get_batch, val_windows
from model.training.evaluate import evaluate
from model.training.optim import clip_grads, lr_at, make_optimizer, set_lr
from model.training.plan import STATE_VERSION, Plan, resolve
from model.training.settings import ArgError

LOG_EVERY_S = 5.0  # log.jsonl is also rewritten this often between evaluations, so live views (the app) follow
SAMPLE_TOKENS = 48  # a short sample written with every evaluation: what the model writes by now (the app shows it)


class TrainingDiverged(RuntimeError):
    """A loss went NaN or infinite; the message says which checkpoint was kept and what to do."""


class Trainer:
    """One training run: holds the model, optimizer, data and counters; run() trains and writes the checkpoint."""

    def __init__(self, plan: Plan, t_start: float | None = None):
        args = self.args = plan.settings
        self.dist, self.device, self.dtype = plan.dist, plan.device, plan.dtype
        self.config, self.tokenizer, self.data, self.created = plan.config, plan.tokenizer, plan.data, plan.created
        self.master = self.dist.master  # rank 0: the only process that evaluates, prints and writes files
        self.micro_steps = args.grad_accum // self.dist.world_size  # this rank's share of the micro-batches per step
        if args.threads:
            torch.set_num_threads(args.threads)
        elif self.device.type == "cpu" and self.dist.world_size == 1:  # torchrun gives each process its threads
            busy = busy_elsewhere()
            torch.set_num_threads(default_threads(busy))
            if torch.get_num_threads() == 1 < available_cpus() and self.master:
                print(f"Other processes keep {busy:.1f} CPUs busy: training on 1 thread, which a shared CPU slows least "
                      "(--threads N to choose).", flush=True)
        if plan.weights is None:
            torch.manual_seed(args.seed)
            model = GPT(self.config)
        else:
            model = checkpoint.build_model(self.config, plan.weights, args.init_from or f"{args.out_dir}/{checkpoint.TRAIN_STATE}")
        # Whether each evaluation scores the whole split: then the best one is already the final score.
        self.evals_whole = len(val_windows(self.data.val, self.config.block_size)) <= args.eval_windows
        self.out = Path(args.out_dir)
        self.raw_model = model.to(self.device)
        self.model = torch.compile(self.raw_model) if args.compile else self.raw_model
        if self.dist.enabled:
            with distributed.peer_errors():  # DDP starts by broadcasting rank 0's weights
                self.model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = make_optimizer(self.raw_model, args.lr, args.weight_decay, (args.beta1, args.beta2), self.device.type,
                                        args.optimizer, args.muon_lr_scale)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.batch_gen = torch.Generator().manual_seed(args.seed)
        self.tokens_per_step = args.batch_size * args.block_size * args.grad_accum  # all ranks together
        self.budget = Budget(args.max_minutes, args.max_iters, args.warmup_iters, t_start)
        self.step, self.tokens_seen = 0, 0
        self.best_val, self.best_step = math.inf, -1
        self.best_scores: dict[str, float] | None = None  # the best evaluation's scores, this session
        self.evals_since_best = 0  # evaluations in a row without a new best (early stopping)
        self.eval_sec_per_token, self.save_seconds = 0.0, 0.0
        self.records: list[dict[str, Any]] = []
        self.t_log = time.perf_counter()  # when log.jsonl was last written
        self.failure: str | None = None  # why a loss went non-finite; training stops at the next step
        self.stopped_early: str | None = None  # why validation ended the run before its budget
        self.saved_step = self.step if plan.state is not None else -1  # the step of train_state.pt on disk
        if plan.state is not None:
            self._restore(plan.state)
            self.update_reserve()
        self.sized_by_text = plan.sized_by_text
        self.last_eval_step = self.step if plan.state is not None else -1

    # ---- time budget and schedule -------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Wall-clock seconds of this run so far, including earlier sessions of a resumed run."""
        return self.budget.elapsed()

    def update_reserve(self) -> None:
        """Keep the budget's reserve for what follows training: the final evaluation (unless the best one scored the
        whole split), one more periodic evaluation and the writes."""
        final_eval = 0.0 if self.final_is_known() else self.eval_sec_per_token * len(self.data.val) * 1.2
        periodic_eval = self.eval_sec_per_token * min(len(self.data.val), self.args.eval_windows * self.config.block_size)
        self.budget.reserve = final_eval + periodic_eval + 2 * self.save_seconds + 1.0

    def plan_step(self) -> tuple[bool, float, float]:
        """Whether to stop, and the warmup and decay fractions of the next step: rank 0's, on every rank.

        They depend on each process's own clock (and on rank 0's evaluation), so rank 0 takes them and broadcasts them:
        all ranks stay in lockstep.
        """
        stop = self.failure is not None or self.stopped_early is not None or self.budget.done(self.step)
        warm, decay = (0.0, 0.0) if stop else self.budget.fractions(self.step)
        stop, failed, warm, decay = self.dist.from_master([float(stop), float(self.failure is not None), warm, decay], self.device)
        if failed > 0.5 and self.failure is None:
            self.failure = "rank 0 found a non-finite validation loss"
        return stop > 0.5, warm, decay

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ---- training -----------------------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch: every rank draws the same batch_size * world_size windows and keeps its own slice.

        So all ranks keep one RNG state, and N ranks train on exactly the windows one process would with the same flags.
        """
        a, world, rank = self.args, self.dist.world_size, self.dist.rank
        if world == 1:
            return get_batch(self.data.train, a.batch_size, a.block_size, self.batch_gen, self.device)
        x, y = get_batch(self.data.train, a.batch_size * world, a.block_size, self.batch_gen)
        part = slice(rank * a.batch_size, (rank + 1) * a.batch_size)
        return x[part].to(self.device), y[part].to(self.device)

    def train_step(self) -> tuple[float, float]:
        """One optimizer update over grad_accum micro-batches (split across ranks); returns the mean loss and the pre-clip grad norm.

        A non-finite loss (or gradient norm, without fp16's GradScaler, which skips those steps itself) sets self.failure
        and skips the update, so the weights stay as they were. Loss and norm are the same on every rank.
        """
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        with distributed.peer_errors():
            for i in range(self.micro_steps):
                x, y = self.next_batch()
                last = i == self.micro_steps - 1  # DDP averages the gradients across ranks only after the last micro-step
                with contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync():
                    with self.autocast():
                        _, loss = self.model(x, y)
                    loss = loss / self.micro_steps
                    self.scaler.scale(loss).backward()
                total += float(loss.detach())
        total = self.dist.mean(total, self.device)
        self.scaler.unscale_(self.optimizer)
        norm = clip_grads(self.raw_model, self.args.grad_clip)
        if not math.isfinite(total) or (not self.scaler.is_enabled() and not math.isfinite(norm)):
            what = f"the training loss is {total}" if not math.isfinite(total) else f"the gradient norm is {norm}"
            self.failure = f"training diverged at step {self.step + 1} ({what})"
            return total, norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, norm

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train until max_iters or the time budget, then score the best weights on the whole validation split.

        stop_after ends the session at that step as an interruption would: the state is saved for --resume.
        Raises TrainingDiverged when a loss goes non-finite, and ArgError when the time budget leaves no room for one step.
        """
        args = self.args
        self._announce()
        unwritten = False  # a new run writes its step-0 checkpoint only once it is sure to train (or is interrupted)
        if self.step == 0 and self.last_eval_step < 0:
            unwritten = self.evaluate_and_save(write=False) is not None
        bar: tqdm | None = None  # drawn once a first step is certain
        loss, norm, tok_s = math.nan, 0.0, 0.0
        interrupted = False
        try:
            while True:
                stop, warm, decay = self.plan_step()
                if stop:
                    break
                if unwritten:
                    self.save(improved=True)
                    unwritten = False
                if bar is None:
                    bar = self._progress_bar()
                lr = lr_at(warm, decay, args.lr, args.min_lr)
                set_lr(self.optimizer, lr)
                t0 = time.perf_counter()
                loss, norm = self.train_step()
                if self.failure is not None:
                    break
                dt = time.perf_counter() - t0
                self.budget.took(dt)
                tok_s = self.tokens_per_step / dt if tok_s == 0 else 0.9 * tok_s + 0.1 * self.tokens_per_step / dt
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                self._advance(bar, loss=f"{loss:.3f}", lr=f"{lr:.2e}", norm=f"{norm:.2f}", tok_s=f"{tok_s:,.0f}")
                if self.step % args.log_interval == 0:
                    self.records.append({"step": self.step, "train_loss": loss,
                                         "train_nats_per_char": loss * len(self.data.train) / max(self.data.train_chars, 1),
                                         "lr": lr, "grad_norm": norm,
                                         "tokens_per_s": tok_s, "elapsed": round(self.elapsed(), 2)})
                    if self.master and time.perf_counter() - self.t_log >= LOG_EVERY_S:
                        self.write_log(plot=False)
                if self.step % args.eval_interval == 0:
                    self.evaluate_and_save(bar)
                if stop_after is not None and self.step >= stop_after:
                    interrupted = True
                    break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
        train_seconds = self.elapsed()
        if not self.master:  # rank 0 reports failures and writes the files
            return {"step": self.step, "last_loss": loss, "interrupted": interrupted, "failed": self.failure is not None}
        if self.failure is not None:
            self._fail()
        if unwritten and not interrupted:
            self._too_short()
        if interrupted:
            if unwritten:
                self.save_best()
            self.save_state()
            self.write_log()
            print(f"stopped at step {self.step}; continue with: python train.py --out-dir {args.out_dir} --resume")
            return {"step": self.step, "last_loss": loss, "interrupted": True}
        if self.last_eval_step != self.step:
            self.evaluate_and_save()
            if self.failure is not None:
                self._fail()
        metrics = self.final_metrics(train_seconds)
        return {**metrics, "last_loss": loss, "interrupted": False}

    def _progress_bar(self) -> tqdm:
        """With a time budget: elapsed seconds out of the budget's (the run's real end); else steps out of --max-iters.

        Either total is fixed, so the bar never jumps; a timed bar shows the step in its postfix.
        """
        common = {"dynamic_ncols": True, "smoothing": 0.1, "disable": not self.master}
        if self.args.max_minutes:
            return tqdm(total=self.args.max_minutes * 60, initial=self.elapsed(), unit="s", **common,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of the budget [{elapsed}<{remaining}{postfix}]")
        return tqdm(total=self.args.max_iters, initial=self.step, unit="step", **common)

    def _advance(self, bar: tqdm, **postfix: str) -> None:
        """Move the bar after a step: to the elapsed time of a timed run, else by one step."""
        if self.args.max_minutes:
            bar.set_postfix({"step": self.step}, **postfix, refresh=False)
            bar.update(min(self.elapsed(), bar.total) - bar.n)
        else:
            bar.set_postfix(**postfix, refresh=False)
            bar.update(1)

    def evaluate_and_save(self, bar: tqdm | None = None, write: bool = True) -> dict[str, float] | None:
        """Score the validation windows; keep the weights when they are the best so far; save the state.

        Only rank 0 evaluates (the others go on and wait for it at the next step's broadcast) and returns the scores.
        write=False leaves the writes to the caller (run(), for step 0). A non-finite loss sets self.failure and writes nothing.
        """
        if not self.master:
            self.last_eval_step = self.step
            return None
        t0 = time.perf_counter()
        val = evaluate(self.raw_model, self.data.val, self.data.val_chars, self.config.block_size, device=self.device,
                       autocast=self.autocast(), max_windows=self.args.eval_windows)
        self.last_eval_step = self.step
        if not math.isfinite(val["val_nats_per_token"]):
            where = "of the initial weights" if self.step == 0 else f"at step {self.step}"
            self.failure = f"the validation loss {where} is {val['val_nats_per_token']}"
            return val
        sample = self.sample()  # before the best is updated: a Ctrl-C here leaves the saved state consistent
        self.eval_sec_per_token = (time.perf_counter() - t0) / max(val["val_tokens"], 1)  # the sample counted in
        improved = val["val_nats_per_token"] < self.best_val
        if improved:
            self.best_val, self.best_step, self.best_scores = val["val_nats_per_token"], self.step, val
        self.evals_since_best = 0 if improved else self.evals_since_best + 1
        if self.args.patience and self.evals_since_best >= self.args.patience:
            self.stopped_early = (f"stopping early at step {self.step}: validation has not improved for {self.evals_since_best} "
                                  f"evaluations ({self.step - self.best_step} steps); the best weights are step {self.best_step}'s")
        self.records.append({"step": self.step, "val_nats_per_token": val["val_nats_per_token"],
                             "val_nats_per_char": val["val_nats_per_char"], "val_tokens": val["val_tokens"],
                             "tokens_seen": self.tokens_seen, "elapsed": round(self.elapsed(), 2),
                             "sample": sample})
        msg = (f"step {self.step}: val {val['val_nats_per_token']:.4f} nats/token, {val['val_nats_per_char']:.4f} nats/char"
               + ((" (best, saved)" if write else " (best)") if improved else ""))
        (bar.write if bar is not None else print)(msg)
        if self.stopped_early:
            (bar.write if bar is not None else print)(self.stopped_early)
        if write:
            self.save(improved)
        self.update_reserve()
        return val

    def sample(self) -> str:
        """A short continuation of a new line by the current weights (fixed seed), for the log and the app's live view.

        The one-row KV cache stays between evaluations (the training forward ignores it), so once the engine traces
        the step it keeps that trace instead of making a new one at every evaluation."""
        sampling = SamplingConfig(max_new_tokens=SAMPLE_TOKENS, temperature=0.8, top_k=50, seed=self.args.seed)
        return generate(self.raw_model, self.tokenizer, "\n", 1, sampling)[0]

    def save(self, improved: bool) -> None:
        """I/O after an evaluation: the best weights when they improved, the resume state and the log."""
        t0 = time.perf_counter()
        if improved:
            self.save_best()
        self.save_state()
        self.write_log()
        self.save_seconds = time.perf_counter() - t0

    def final_is_known(self) -> bool:
        """Whether the final score is the best evaluation's (it scored the whole split, in this session)."""
        return self.evals_whole and self.best_scores is not None

    def final_metrics(self, train_seconds: float) -> dict[str, Any]:
        """I/O: load the best weights and score them on the whole validation split in windows of the model's context.

        The score is also the last val record of log.jsonl (and point of loss.png), marked final.
        """
        if self.final_is_known():
            val = self.best_scores  # the best weights' evaluation already covered the whole split: not scored twice
        else:
            best = self.out / checkpoint.WEIGHTS
            checkpoint.load_weights(self.raw_model, checkpoint.load_state_dict(best), str(best))
            print(f"final evaluation of the best weights (step {self.best_step}) on the whole validation split ...")
            val = evaluate(self.raw_model, self.data.val, self.data.val_chars, self.config.block_size, device=self.device,
                           autocast=self.autocast())
        metrics = {**val, "step": self.step, "best_step": self.best_step, "stopped_early": self.stopped_early is not None,
                   "tokens_seen": self.tokens_seen,
                   "train_seconds": round(train_seconds, 2), "params": self.raw_model.num_params(),
                   "eval_dtype": str(self.dtype).removeprefix("torch."), "eval_block_size": self.config.block_size}
        checkpoint.write_json(self.out / checkpoint.METRICS, {**metrics, "total_seconds": round(self.elapsed(), 2)})
        self.records.append({"step": self.step, "final": True, "best_step": self.best_step, **val,
                             "tokens_seen": self.tokens_seen, "elapsed": round(self.elapsed(), 2)})
        self.write_log()
        print(f"done in {self.elapsed():.0f} s: val {val['val_nats_per_token']:.4f} nats/token, "
              f"{val['val_nats_per_char']:.4f} nats/char; checkpoint in {self.out}/")
        return metrics

    def _fail(self) -> NoReturn:
        """I/O: end a run whose loss went non-finite, keeping the last good checkpoint, or writing nothing if there is none."""
        if self.best_step < 0:
            self._remove_created()
            raise TrainingDiverged(f"{self.failure}, so there is no good checkpoint to keep and nothing was written: check the "
                                   "model you start from (--init-from), or train in --dtype fp32.")
        raise TrainingDiverged(
            f"{self.failure}, so training stopped; {self.out}/ keeps the last good checkpoint (the best weights, of step "
            f"{self.best_step}) and the state of step {self.saved_step}: train again with a lower --lr (now {self.args.lr:g}), "
            f"or continue from step {self.saved_step} with --resume --lr LOWER."
        )

    def _too_short(self) -> NoReturn:
        """I/O: a new run whose time budget ran out before its first step: say so and leave nothing behind."""
        self._remove_created()
        budget = self.args.max_minutes * 60
        reserve = self.budget.reserve
        raise ArgError(f"--max-minutes {self.args.max_minutes:g} ({budget:g} s in all) is too short to train a single step: start-up "
                       f"and the first evaluation took {self.elapsed():.1f} s, and the final evaluation and writes need about "
                       f"{reserve:.1f} s more; give a larger --max-minutes, or 0 for no time limit.")

    def _remove_created(self) -> None:
        """I/O: remove the folders this run created (the token cache), for a run that ends without a checkpoint."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)

    # ---- rank-0 I/O --------------------------------------------------------------------------------------

    def _announce(self) -> None:
        if not self.master:
            return
        a = self.args
        origin = f"init from {a.init_from}" if a.init_from else f"preset {a.preset}"
        if self.sized_by_text:
            origin += f" sized for {len(self.data.train):,} training tokens"
        print(f"model: {self.raw_model.num_params() / 1e6:.2f}M parameters ({origin}, {self.config.n_layer}x{self.config.n_embd}, "
              f"context {self.config.block_size}, tokenizer {self.tokenizer.name}); training window {a.block_size}")
        print(f"data: {len(self.data.train):,} train / {len(self.data.val):,} val tokens; "
              f"{self.tokens_per_step:,} tokens per step; device {self.device}, {str(self.dtype).removeprefix('torch.')}")
        warning = self.data.short_val_warning(self.config.block_size)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if self.dist.enabled:
            print(f"data-parallel: {self.dist.world_size} processes x batch {a.batch_size} x {self.micro_steps} micro-steps x "
                  f"{a.block_size} tokens = global batch of {self.tokens_per_step:,} tokens per step")
        if a.max_minutes:
            print(f"time budget: {a.max_minutes:g} min in total (training stops early enough for the final evaluation)")

    def save_best(self) -> None:
        """I/O: the best weights and config.json (a complete, loadable checkpoint after every improvement)."""
        checkpoint.save_weights(self.out / checkpoint.WEIGHTS, self.raw_model)
        checkpoint.save_config(self.out, self.config, self.tokenizer.spec, self.args.to_dict())

    def save_state(self) -> None:
        """I/O: what --resume needs, as plain tensors and containers (loaded with weights_only=True)."""
        rng = {"torch": torch.get_rng_state(), "batch": self.batch_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"version": STATE_VERSION, "args": self.args.to_dict(), "model_config": self.config.to_dict(),
                 "tokenizer": self.tokenizer.spec, "model": {k: v.cpu() for k, v in self.raw_model.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                 "tokens_seen": self.tokens_seen, **self.budget.state(),
                 "best_val": self.best_val, "best_step": self.best_step, "evals_since_best": self.evals_since_best,
                 "eval_sec_per_token": self.eval_sec_per_token,
                 "rng": rng}
        checkpoint.save_train_state(self.out / checkpoint.TRAIN_STATE, state)
        self.saved_step = self.step

    def write_log(self, plot: bool = True) -> None:
        """I/O: log.jsonl (one record per log interval and per eval) and loss.png, both rewritten atomically."""
        atomic.write_text(self.out / LOG, "".join(json.dumps(r) + "\n" for r in self.records))
        self.t_log = time.perf_counter()
        if plot:
            plot_losses(self.records, self.out / PLOT, title=f"{self.out.name}: {self.raw_model.num_params() / 1e6:.1f}M params")

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue a saved run exactly: optimizer, counters, RNG streams and the log up to the saved step."""
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
            self.budget.restore(state)
            self.best_val, self.best_step = float(state["best_val"]), int(state["best_step"])
            self.eval_sec_per_token = float(state["eval_sec_per_token"])
            self.evals_since_best = int(state.get("evals_since_best", 0))
            torch.set_rng_state(state["rng"]["torch"])
            self.batch_gen.set_state(state["rng"]["batch"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"Cannot resume: {self.out / checkpoint.TRAIN_STATE} is incomplete or from another "
                                  f"setup ({type(e).__name__}: {e}); train again without --resume.") from None
        self.records = [r for r in read_log(self.out / LOG) if r.get("step", 0) <= self.step and not r.get("final")]
        self.saved_step = self.step


def train(given: dict[str, Any], stop_after: int | None = None, t_start: float | None = None) -> dict[str, Any]:
    """Resolve the settings from the given flags, check everything, train, and return the final metrics.

    t_start (a time.perf_counter() value) is when the time budget starts: the CLI passes its own start.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    try:
        plan = resolve(given)
        trainer = Trainer(plan, t_start)
        del plan  # the starting weights and resume state are in the trainer now: free the copies
        return trainer.run(stop_after=stop_after)
    finally:
        distributed.teardown()
