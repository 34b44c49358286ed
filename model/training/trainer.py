"""The training loop of a resolved plan (model/training/plan.py), nanoGPT style: Trainer.run() is the whole step loop.
Every question about time is the Budget's (model/training/budget.py); the files of a run are RunFiles' (below).

Data-parallel under torchrun (see model/training/distributed.py): every rank draws the same global micro-batch and trains on its
own slice, the gradient accumulation micro-steps are split across ranks (all but the last under DDP's no_sync), rank 0
takes every clock-based decision for all, and only rank 0 evaluates, prints and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.nn.parallel import DistributedDataParallel

from model import atomic
from model.config import GPTConfig
from model.formats import checkpoint
from model.formats.checkpoint import LOG, PLOT, CheckpointError, read_log
from model.generation.generate import SamplingConfig, generate
from model.gpt import GPT
from model.plot import plot_losses
from model.progress import Progress
from model.tokenizer import Tokenizer
from model.training import distributed
from model.training.budget import Budget, minutes_text
from model.training.data import batch_starts, get_batch, val_windows
from model.training.distill import SoftTargets, distill_loss, load_teachers, teach
from model.training.evaluate import evaluate
from model.training.optim import clip_grads, lr_at, make_optimizer, set_lr
from model.training.plan import STATE_VERSION, Plan, resolve

LOG_EVERY_S = 5.0  # log.jsonl is rewritten, and a train record written, at least this often, so live views (the app) follow
SAMPLE_TOKENS = 48  # a short sample written with every evaluation: what the model writes by now (the app shows it)
ESTIMATE_WINDOWS = 16  # a cheap validation estimate (a budgeted run's step 0 and curve points) scores this many windows


class TrainingDiverged(RuntimeError):
    """A loss went NaN or infinite; the message says which checkpoint was kept and what to do."""


@dataclass
class RunState:
    """What a run carries from step to step and across --resume: saved to train_state.pt (beside the Budget's clock) and
    restored from this one field list, as plain numbers."""

    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf  # the best validation nats/token so far
    best_step: int = -1  # its step, -1 before the first evaluation
    evals_since_best: int = 0  # evaluations in a row without a new best (early stopping)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> RunState:
        return cls(**{f.name: type(f.default)(saved[f.name]) for f in dataclasses.fields(cls) if f.name in saved})


@dataclass(frozen=True)
class TrainResult:
    """What train() returns, on every rank."""

    step: int  # the last step trained
    last_loss: float  # its training loss (NaN when no step ran)
    interrupted: bool = False  # stopped before the end (Ctrl-C, stop_after): the state is saved for --resume
    failed: bool = False  # a rank other than 0, whose run rank 0 found diverged (rank 0 raises TrainingDiverged)
    metrics: dict[str, Any] | None = None  # metrics.json's scores: rank 0 of a finished run
    capped: bool = False  # the size's passes cap (or early stopping under it) ended the run, not the time budget


class RunFiles:
    """Rank 0's files in --out-dir: the best weights with config.json, train_state.pt, log.jsonl and loss.png, metrics.json."""

    def __init__(self, plan: Plan, model: GPT):
        self.out, self.created, self.model = Path(plan.settings.out_dir), plan.created, model
        self.config: GPTConfig = plan.config
        self.tokenizer: Tokenizer = plan.tokenizer
        self.settings = plan.settings
        self.records: list[dict[str, Any]] = []  # log.jsonl: a train record per log interval, a val record per evaluation
        self.t_log = time.perf_counter()  # when log.jsonl was last written
        self.saved_step = -1  # the step of train_state.pt on disk

    def save_best(self, step: int) -> None:
        """The best weights (of this step) and config.json: a complete, loadable checkpoint after every improvement, whose
        files describe the same weights at every instant (checkpoint.save_model)."""
        checkpoint.save_model(self.out, self.model, self.tokenizer.spec, self.settings.to_dict(), step)

    def save_state(self, state: dict[str, Any]) -> None:
        """What --resume needs, as plain tensors and containers (loaded with weights_only=True)."""
        checkpoint.save_train_state(self.out / checkpoint.TRAIN_STATE, state)
        self.saved_step = state["step"]

    def write_log(self, plot: bool = True) -> None:
        """log.jsonl and loss.png, both rewritten atomically."""
        atomic.write_text(self.out / LOG, "".join(json.dumps(r) + "\n" for r in self.records))
        self.t_log = time.perf_counter()
        if plot:
            plot_losses(self.records, self.out / PLOT, title=f"{self.out.name}: {self.model.num_params() / 1e6:.1f}M params")

    def resume_log(self, step: int) -> None:
        """Continue log.jsonl of a resumed run from its records up to the saved step."""
        self.records = [r for r in read_log(self.out / LOG) if r.get("step", 0) <= step and not r.get("final")]
        self.saved_step = step

    def remove_created(self) -> None:
        """Remove the folders this run created (the token cache), for a run that ends without a checkpoint."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


def sampling_twin(model: GPT) -> GPT:
    """A GPT (eval mode) whose parameters are model's own Parameter objects, so it always samples with the weights as
    they are now, and whose buffers are its own: the KV caches and traces of generating go on it, not on model."""
    with torch.device("meta"):  # no weights of its own to allocate
        twin = GPT(model.config, init_weights=False)
    twin.load_state_dict(model.state_dict(keep_vars=True), assign=True)
    for name, buffer in model.named_buffers():  # the rotary tables (read only)
        setattr(twin, name, buffer)
    return twin.eval()


class Trainer:
    """One run: the model (DDP-wrapped under torchrun), optimizer, data, Budget and RunState; run() trains."""

    def __init__(self, plan: Plan, t_start: float | None = None):
        s = self.settings = plan.settings
        self.sized_by_text = plan.sized_by_text  # whether the cpu preset chose the shape by the text (announced)
        self.max_epochs = plan.max_epochs  # the passes over the text that capped the steps (announced)
        self.dist, self.device, self.dtype = plan.dist, plan.device, plan.dtype
        self.config, self.tokenizer, self.data = plan.config, plan.tokenizer, plan.data
        self.master = self.dist.master  # rank 0: the only process that evaluates, prints and writes files
        self.micro_steps = s.grad_accum // self.dist.world_size  # this rank's share of the micro-batches per step
        self.tokens_per_step = s.batch_size * s.block_size * s.grad_accum  # all ranks together
        if plan.weights is None:
            torch.manual_seed(s.seed)
            model = GPT(self.config)
        else:
            model = checkpoint.build_model(self.config, plan.weights, s.init_from or f"{s.out_dir}/{checkpoint.TRAIN_STATE}")
        self.raw_model = model.to(self.device)
        self.sampler: GPT | None = None  # what writes the evaluation samples, over the same weights (sampling_twin)
        self.model = torch.compile(self.raw_model) if s.compile else self.raw_model
        if self.dist.enabled:
            with distributed.peer_errors():  # DDP starts by broadcasting rank 0's weights
                self.model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = make_optimizer(self.raw_model, s.lr, s.weight_decay, (s.beta1, s.beta2), self.device.type, s.optimizer,
                                        s.muon_lr_scale)
        self.soft_targets: SoftTargets | None = None  # the teachers' distributions (--teacher), read once before training
        if s.teacher:
            teachers = load_teachers(s.teacher, self.tokenizer, self.config.vocab_size, self.device)
            if self.master:
                print(f"distilling from {len(teachers)} teacher{'s' if len(teachers) > 1 else ''}: "
                      f"{', '.join(s.teacher)}; they read the training split once ...", flush=True)
            self.soft_targets = teach(teachers, self.data.train, s.block_size, self.device, self.autocast(), show=self.master)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.batch_gen = torch.Generator().manual_seed(s.seed)
        self.budget = Budget(s.max_minutes, s.max_iters, s.warmup_iters, t_start)
        self.files = RunFiles(plan, self.raw_model)
        self.state = RunState()
        # Whether each evaluation scores the whole split: then the best one is already the final score.
        self.evals_whole = len(val_windows(self.data.val, self.config.block_size)) <= s.eval_windows
        self.best_scores: dict[str, float] | None = None  # the best evaluation's scores when they cover the whole split (this
        # session): then they are the final score, not measured twice
        self.failure: str | None = None  # why a loss went non-finite; training stops at the next step
        self.stopped_early: str | None = None  # why validation ended the run before its budget
        self.last_eval_step = -1  # the step of the last evaluation (not counting curve estimates)
        self.resumed_at: int | None = None  # the step a resumed run (--resume) started this session from
        if plan.state is not None:
            self.restore(plan.state)
            self.last_eval_step = self.resumed_at = self.state.step
        self.expect_after_training()

    # ---- the step loop ------------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train until max_iters or the time budget, then score the best weights on the whole validation split.

        stop_after ends the session at that step as an interruption would: the state is saved for --resume.
        Raises TrainingDiverged when a loss goes non-finite, and ArgError when the time budget leaves no room for one step.
        """
        s, st = self.settings, self.state
        self.announce()
        unwritten = False  # a new run writes its step-0 checkpoint only once it is sure to train (or is interrupted)
        if self.last_eval_step < 0:  # a new run: the initial weights (a cheap estimate when the budget counts)
            unwritten = self.evaluate(None, write=False, estimate=self.budget.limited) is not None
        progress: Progress | None = None  # shown once a first step is certain
        loss, tok_s, interrupted = math.nan, 0.0, False
        try:
            while True:
                stop, warm, decay = self.plan_step()
                if stop:
                    break
                if unwritten:
                    self.save(improved=True)
                    unwritten = False
                progress = progress or self.progress()
                lr = lr_at(warm, decay, s.lr, s.min_lr)
                set_lr(self.optimizer, lr)
                t0 = time.perf_counter()
                loss, norm = self.train_step()
                if self.failure is not None:
                    break
                dt = time.perf_counter() - t0
                self.budget.took(dt)
                tok_s = self.tokens_per_step / dt if tok_s == 0 else 0.9 * tok_s + 0.1 * self.tokens_per_step / dt
                st.step += 1
                st.tokens_seen += self.tokens_per_step
                status = f"loss={loss:.3f}, lr={lr:.2e}, norm={norm:.2f}, tok/s={tok_s:,.0f}"
                if self.budget.limited:
                    progress.update(self.budget.elapsed(), f"step={st.step}, {status}")
                else:
                    progress.update(st.step, status)
                self.log_train(loss, lr, norm, tok_s)
                if st.step % s.eval_interval == 0:
                    self.evaluate(progress)
                elif self.master and self.budget.curve_point_due():
                    self.evaluate(progress, estimate=True, keep=False)
                if stop_after is not None and st.step >= stop_after:
                    interrupted = True
                    break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if progress is not None:
                progress.close()
        return self.finish(loss, interrupted, unwritten)

    def plan_step(self) -> tuple[bool, float, float]:
        """Whether to stop, and the warmup and decay fractions of the next step: rank 0's, on every rank.

        They depend on each process's own clock (and on rank 0's evaluation), so rank 0 takes them and broadcasts them:
        all ranks stay in lockstep.
        """
        stop = self.failure is not None or self.stopped_early is not None or self.budget.done(self.state.step)
        warm, decay = (0.0, 0.0) if stop else self.budget.fractions(self.state.step)
        stop, failed, warm, decay = self.dist.from_master([float(stop), float(self.failure is not None), warm, decay], self.device)
        if failed > 0.5 and self.failure is None:
            self.failure = "rank 0 found a non-finite validation loss"
        return stop > 0.5, warm, decay

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """This rank's micro-batch and its windows' starts: every rank draws the same batch_size * world_size windows
        and keeps its own slice.

        So all ranks keep one RNG state, and N ranks train on exactly the windows one process would with the same flags.
        """
        s, world, rank = self.settings, self.dist.world_size, self.dist.rank
        starts = batch_starts(len(self.data.train), s.batch_size * world, s.block_size, self.batch_gen)
        starts = starts[rank * s.batch_size:(rank + 1) * s.batch_size]
        x, y = get_batch(self.data.train, s.batch_size, s.block_size, self.batch_gen, self.device, starts=starts)
        return x, y, starts

    def train_step(self) -> tuple[float, float]:
        """One optimizer update over grad_accum micro-batches (split across ranks); returns the mean loss and the pre-clip grad norm.

        A non-finite loss (or gradient norm, without fp16's GradScaler, which skips those steps itself) sets self.failure
        and skips the update, so the weights stay as they were. Loss and norm are the same on every rank.
        """
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        with distributed.peer_errors():
            for i in range(self.micro_steps):
                x, y, starts = self.next_batch()
                last = i == self.micro_steps - 1  # DDP averages the gradients across ranks only after the last micro-step
                with contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync():
                    loss, shown = self.loss(x, y, starts)
                    self.scaler.scale(loss / self.micro_steps).backward()
                total += float(shown) / self.micro_steps
        total = self.dist.mean(total, self.device)
        self.scaler.unscale_(self.optimizer)
        norm = clip_grads(self.raw_model, self.settings.grad_clip)
        if not math.isfinite(total) or (not self.scaler.is_enabled() and not math.isfinite(norm)):
            what = f"the training loss is {total}" if not math.isfinite(total) else f"the gradient norm is {norm}"
            self.failure = f"training diverged at step {self.state.step + 1} ({what})"
            return total, norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, norm

    def loss(self, x: torch.Tensor, y: torch.Tensor, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch's loss to train on, and its cross-entropy with the text (the logged loss): the same without
        teachers; with them, distill_loss with their targets at these windows' starts."""
        if self.soft_targets is None:
            with self.autocast():
                _, loss = self.model(x, y)
            return loss, loss.detach()
        with self.autocast():
            logits, _ = self.model(x)
        return distill_loss(logits, y, *self.soft_targets.at(starts, x.shape[1], self.device))

    def log_train(self, loss: float, lr: float, norm: float, tok_s: float) -> None:
        """A train record every --log-interval steps, and after LOG_EVERY_S seconds without one (so a short run of slow
        steps still draws a train curve); log.jsonl rewritten as often, so live views follow."""
        st, files = self.state, self.files
        last = next((r["elapsed"] for r in reversed(files.records) if "train_loss" in r), self.budget.t_loop)
        late = self.budget.elapsed() - last >= LOG_EVERY_S
        if st.step % self.settings.log_interval and not late:
            return
        files.records.append({"step": st.step, "train_loss": loss,
                              "train_nats_per_char": loss * len(self.data.train) / max(self.data.train_chars, 1),
                              "lr": lr, "grad_norm": norm, "tokens_per_s": tok_s, "elapsed": round(self.budget.elapsed(), 2)})
        if self.master and time.perf_counter() - files.t_log >= LOG_EVERY_S:
            files.write_log(plot=False)

    # ---- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, progress: Progress | None, write: bool = True, estimate: bool = False,
                 keep: bool = True) -> dict[str, float] | None:
        """Score the validation windows (--eval-windows of them, or ESTIMATE_WINDOWS for a cheap estimate) and log them.

        keep: also write a sample, keep the weights when they are the best so far (saving the state unless write=False:
        run() writes step 0's itself) and count the evaluation for early stopping. A curve point (keep=False) only logs.
        Only rank 0 evaluates (the others go on and wait for it at the next step's broadcast) and returns the scores.
        A non-finite loss sets self.failure and writes nothing.
        """
        st, say = self.state, progress.write if progress is not None else print
        if keep:
            self.last_eval_step = st.step
        if not self.master:
            return None
        t0 = time.perf_counter()
        windows = min(ESTIMATE_WINDOWS, self.settings.eval_windows) if estimate else self.settings.eval_windows
        val = evaluate(self.raw_model, self.data.val, self.data.val_chars, self.config.block_size, device=self.device,
                       autocast=self.autocast(), max_windows=windows)
        if not math.isfinite(val["val_nats_per_token"]):
            where = "of the initial weights" if st.step == 0 else f"at step {st.step}"
            self.failure = f"the validation loss {where} is {val['val_nats_per_token']}"
            return val
        record = {"step": st.step, "val_nats_per_token": val["val_nats_per_token"], "val_nats_per_char": val["val_nats_per_char"],
                  "val_tokens": val["val_tokens"], **({"estimate": True} if estimate else {}), "tokens_seen": st.tokens_seen}
        if not keep:  # a curve point
            self.budget.evaluated(time.perf_counter() - t0, val["val_tokens"])
            self.files.records.append({**record, "elapsed": round(self.budget.elapsed(), 2)})
            return val
        t_sample = time.perf_counter()
        sample = self.sample()  # before the best is updated: a Ctrl-C here leaves the saved state consistent
        self.budget.evaluated(t_sample - t0, val["val_tokens"], time.perf_counter() - t_sample)
        improved = val["val_nats_per_token"] < st.best_val
        if improved:
            st.best_val, st.best_step = val["val_nats_per_token"], st.step
            self.best_scores = val if self.evals_whole and not estimate else None
        st.evals_since_best = 0 if improved else st.evals_since_best + 1
        if self.settings.patience and st.evals_since_best >= self.settings.patience:
            self.stopped_early = (f"stopping early at step {st.step}: validation has not improved for {st.evals_since_best} "
                                  f"evaluations ({st.step - st.best_step} steps); the best weights are step {st.best_step}'s")
        self.files.records.append({**record, "elapsed": round(self.budget.elapsed(), 2), "sample": sample})
        what = "val estimate" if estimate else "val"
        say(f"step {st.step}: {what} {val['val_nats_per_token']:.4f} nats/token, {val['val_nats_per_char']:.4f} nats/char"
            + ((" (best, saved)" if write else " (best)") if improved else ""))
        if self.stopped_early:
            say(self.stopped_early)
        if write:
            self.save(improved)
        self.expect_after_training()
        return val

    def sample(self) -> str:
        """A short continuation of a new line by the current weights (fixed seed), for the log and the app's live view.

        It is written by a twin of the training model over the same weight tensors, which keeps the KV caches between
        evaluations, so once the engine traces the step it keeps that trace instead of making a new one at every
        evaluation; the training model itself carries no cache (nor DDP any buffer that one rank has)."""
        if self.sampler is None:
            self.sampler = sampling_twin(self.raw_model)
        sampling = SamplingConfig(max_new_tokens=SAMPLE_TOKENS, temperature=0.8, top_k=50, seed=self.settings.seed)
        return generate(self.sampler, self.tokenizer, "\n", 1, sampling)[0]

    def expect_after_training(self) -> None:
        """Tell the budget what follows training: the final evaluation (unless already known) after one more evaluation."""
        val, windows = len(self.data.val), self.settings.eval_windows * self.config.block_size
        self.budget.expect(final_tokens=0 if self.best_scores is not None else val, eval_tokens=min(val, windows))

    # ---- the end of a run, and what it writes (rank 0) ----------------------------------------------------

    def finish(self, loss: float, interrupted: bool, unwritten: bool) -> TrainResult:
        """After the loop: rank 0 reports a failure, saves an interrupted run for --resume, or scores the best weights."""
        st, train_seconds = self.state, self.budget.elapsed()
        if not self.master:  # rank 0 reports failures and writes the files
            return TrainResult(st.step, loss, interrupted, failed=self.failure is not None)
        if self.failure is not None:
            self.fail()
        if unwritten and not interrupted:
            self.files.remove_created()
            raise self.budget.too_short()
        if interrupted:
            if unwritten:
                self.files.save_best(st.step)
            self.files.save_state(self.resume_state())
            self.files.write_log()
            print(f"stopped at step {st.step}; continue with: python train.py --out-dir {self.settings.out_dir} --resume")
            return TrainResult(st.step, loss, interrupted=True)
        if self.last_eval_step != st.step:
            self.evaluate(None)
            if self.failure is not None:
                self.fail()
        capped = self.max_epochs is not None and (st.step >= self.settings.max_iters or self.stopped_early is not None)
        return TrainResult(st.step, loss, metrics=self.final_metrics(train_seconds), capped=capped)

    def save(self, improved: bool) -> None:
        """After an evaluation: the best weights when they improved, the resume state and the log."""
        t0 = time.perf_counter()
        if improved:
            self.files.save_best(self.state.best_step)
        self.files.save_state(self.resume_state())
        self.files.write_log()
        self.budget.saved(time.perf_counter() - t0)

    def final_metrics(self, train_seconds: float) -> dict[str, Any]:
        """Load the best weights and score them on the whole validation split in windows of the model's context (unless
        their evaluation already did); write metrics.json. The score is also log.jsonl's last val record, marked final."""
        st, out = self.state, self.files.out
        val = self.best_scores
        if val is None:
            checkpoint.load_weights(self.raw_model, checkpoint.load_state_dict(out / checkpoint.WEIGHTS), str(out / checkpoint.WEIGHTS))
            print(f"final evaluation of the best weights (step {st.best_step}) on the whole validation split ...")
            val = evaluate(self.raw_model, self.data.val, self.data.val_chars, self.config.block_size, device=self.device,
                           autocast=self.autocast())
        metrics = {**val, "step": st.step, "best_step": st.best_step, "stopped_early": self.stopped_early is not None,
                   "tokens_seen": st.tokens_seen, "train_seconds": round(train_seconds, 2), "params": self.raw_model.num_params(),
                   "eval_dtype": str(self.dtype).removeprefix("torch."), "eval_block_size": self.config.block_size}
        elapsed = self.budget.elapsed()
        checkpoint.write_json(out / checkpoint.METRICS, {**metrics, "total_seconds": round(elapsed, 2)})
        self.files.records.append({"step": st.step, "final": True, "best_step": st.best_step, **val,
                                   "tokens_seen": st.tokens_seen, "elapsed": round(elapsed, 2)})
        self.files.write_log()
        print(f"{self.time_done(elapsed)}: val {val['val_nats_per_token']:.4f} nats/token, "
              f"{val['val_nats_per_char']:.4f} nats/char; checkpoint in {out}/")
        return metrics

    def time_done(self, elapsed: float) -> str:
        """What the end of a run took: the run's time; for a resumed run also this session's, and for a finished run
        resumed (nothing left to train) only this session's, which was its final evaluation."""
        session = time.perf_counter() - self.budget.t_start
        if self.resumed_at is None:
            return f"done in {elapsed:.0f} s"
        if self.resumed_at == self.state.step:
            return f"nothing left to train (the run had finished at step {self.state.step}); evaluated again in {session:.0f} s"
        return f"done in {elapsed:.0f} s, {session:.0f} s of them in this session"

    def fail(self) -> NoReturn:
        """End a run whose loss went non-finite, keeping the last good checkpoint, or writing nothing if there is none."""
        st, saved = self.state, self.files.saved_step
        if st.best_step < 0:
            self.files.remove_created()
            raise TrainingDiverged(f"{self.failure}, so there is no good checkpoint to keep and nothing was written: check the "
                                   "model you start from (--init-from), or train in --dtype fp32.")
        raise TrainingDiverged(
            f"{self.failure}, so training stopped; {self.files.out}/ keeps the last good checkpoint (the best weights, of step "
            f"{st.best_step}) and the state of step {saved}: train again with a lower --lr (now {self.settings.lr:g}), "
            f"or continue from step {saved} with --resume --lr LOWER."
        )

    def resume_state(self) -> dict[str, Any]:
        """train_state.pt: the settings, model, optimizer, RNG streams, the RunState and the Budget's clock, as plain data."""
        rng = {"torch": torch.get_rng_state(), "batch": self.batch_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"version": STATE_VERSION, "args": self.settings.to_dict(), "model_config": self.config.to_dict(),
                "tokenizer": self.tokenizer.spec, "model": {k: v.cpu() for k, v in self.raw_model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                **dataclasses.asdict(self.state), **self.budget.state()}

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue a saved run exactly: optimizer, RunState, clock, RNG streams and the log up to the saved step."""
        try:
            missing = {"step", "tokens_seen", "best_val", "best_step"} - set(saved)  # evals_since_best came later: 0 if absent
            if missing:
                raise KeyError(", ".join(sorted(missing)))
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scaler.load_state_dict(saved["scaler"])
            self.state = RunState.from_saved(saved)
            self.budget.restore(saved)
            torch.set_rng_state(saved["rng"]["torch"])
            self.batch_gen.set_state(saved["rng"]["batch"])
            if "cuda" in saved["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved["rng"]["cuda"], self.device)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"Cannot resume: {self.files.out / checkpoint.TRAIN_STATE} is incomplete or from another "
                                  f"setup ({type(e).__name__}: {e}); train again without --resume.") from None
        self.files.resume_log(self.state.step)

    # ---- what rank 0 shows --------------------------------------------------------------------------------

    def progress(self) -> Progress:
        """With a time budget: the budget's seconds (its clock only); else steps out of --max-iters. Either total is fixed."""
        if self.budget.limited:
            return Progress(self.budget.seconds, "s", "train", initial=self.budget.elapsed(), budget=True, disable=not self.master)
        return Progress(self.settings.max_iters, "step", "train", initial=self.state.step, disable=not self.master)

    def announce(self) -> None:
        if not self.master:
            return
        s = self.settings
        origin = f"init from {s.init_from}" if s.init_from else f"preset {s.preset}"
        if self.sized_by_text:
            origin += f" sized for {len(self.data.train):,} training tokens"
        print(f"model: {self.raw_model.num_params() / 1e6:.2f}M parameters ({origin}, {self.config.n_layer}x{self.config.n_embd}, "
              f"context {self.config.block_size}, tokenizer {self.tokenizer.name}); training window {s.block_size}")
        print(f"data: {len(self.data.train):,} train / {len(self.data.val):,} val tokens; "
              f"{self.tokens_per_step:,} tokens per step; device {self.device}, {str(self.dtype).removeprefix('torch.')}")
        if self.max_epochs:
            print(f"steps: at most {s.max_iters:,}, {self.max_epochs:g} passes over the text, after which a model of this size "
                  "only overfits; the schedule ends there even if the time budget would allow more (--max-iters to choose)")
        warning = self.data.short_val_warning(self.config.block_size)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if self.dist.enabled:
            print(f"data-parallel: {self.dist.world_size} processes x batch {s.batch_size} x {self.micro_steps} micro-steps x "
                  f"{s.block_size} tokens = global batch of {self.tokens_per_step:,} tokens per step")
        if self.budget.limited:
            print(f"time budget: {minutes_text(self.budget.minutes)} in total (training stops early enough for the final evaluation)")


def train(given: dict[str, Any], stop_after: int | None = None, t_start: float | None = None) -> TrainResult:
    """Resolve the settings from the given flags (the threads too), train, and return the result.

    t_start (a time.perf_counter() value) is when the time budget starts: the CLI passes its own start.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    try:
        plan = resolve(given)
        trainer = Trainer(plan, t_start)
        del plan  # the starting weights and resume state are in the trainer now: free the copies
        result = trainer.run(stop_after=stop_after)
        trainer.dist.barrier()  # ranks leave together: one that closes its connections while rank 0 still evaluates and
        return result           # writes can abort in gloo ("terminate called without an active exception")
    finally:
        distributed.teardown()
