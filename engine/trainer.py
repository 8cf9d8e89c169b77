"""The training loop: accumulation windows of one regime's steps (engine/regimes.py: XE or SCST), the learning-rate
schedule, evaluation, checkpoints and exact resume.

The loop knows nothing of the regime's arithmetic. Each window of num_accum micro-batches is normalised by its total
count (tokens or samples) over all processes, so accumulation and DDP give exactly the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from data.loaders import CaptionBatch, EpochBatchSampler, ImageSource
from data.records import ImageRecord
from data.vocab import Vocabulary
from deploy.checkpoints import CHECKPOINT_GLOB, save_model_checkpoint, unwrap
from engine.evaluate import caption_records, quick_cider
from engine.regimes import Regime, StepContext
from engine.runlog import RunLog
from engine.setup import TrainConfig
from eval.caption_stats import caption_stats
from models import ModelConfig
from optims import ScheduleConfig, lr_at
from utils.dist import DistInfo, all_reduce_sum
from utils.plots import save_curves


@dataclass(frozen=True)
class RunPlan:
    """What train.py works out before the loop starts, beside the config itself."""

    run_dir: Path
    schedule: ScheduleConfig
    precision: str
    eval_max_len: int
    eval_at_start: bool = False  # a run that starts from weights validates them first: best.pth never scores lower
    run_config: dict[str, Any] = field(default_factory=dict)  # saved in every checkpoint as "train_config"
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # saved in every checkpoint as they are

    @property
    def phase(self) -> str:
        return self.run_dir.name


@dataclass(frozen=True)
class TrainData:
    """The records of both splits, where their visual input comes from, and how batches of the train split are
    drawn (a sampler) and loaded (a DataLoader made per epoch for the sampler)."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    source: ImageSource | None
    sampler: EpochBatchSampler | None
    loader: Callable[[EpochBatchSampler], Any]


@dataclass
class LoopState:
    """Where training stands: saved in every checkpoint so a killed run continues exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0
    it: int = 0
    step: int = 0
    best_cider: float = -1.0
    finished: bool = False
    skipped_images: int = 0


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def is_compiled(model: nn.Module) -> bool:
    """Whether torch.compile wraps the model (under a DDP wrapper or not)."""
    while not hasattr(model, "_orig_mod"):
        if not (hasattr(model, "module") and isinstance(model.module, nn.Module)):
            return False
        model = model.module
    return True


class Trainer:
    """Runs one phase of one regime: owns the optimizer, loss scaler, sampler position and state; the model may be
    compiled and DDP-wrapped. Every setting it reads is the run's TrainConfig's or the RunPlan's."""

    def __init__(self, model: nn.Module, regime: Regime, optimizer: torch.optim.Optimizer, data: TrainData,
                 cfg: TrainConfig, plan: RunPlan, dist: DistInfo, model_config: ModelConfig, vocab: Vocabulary):
        self.model, self.regime, self.optimizer, self.data = model, regime, optimizer, data
        self.cfg, self.plan, self.dist = cfg, plan, dist
        self.model_config, self.vocab = model_config, vocab
        self.raw = unwrap(model)
        self.device = dist.device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=plan.precision == "fp16")
        self.state = LoopState()
        # under torch.compile (train.py --compile True) SCST's encoder, sampling steps and re-scoring pass run
        # compiled too: the regime calls them on the raw model, which the compiled wrapper would not reach
        self.step_context = StepContext(model, self.raw, self.device, plan.precision, is_compiled(model),
                                        dist.distributed, self._backward)
        self.log = RunLog(plan.run_dir, plan.phase, write=dist.is_main)
        self.last_save = time.monotonic()

    def _backward(self, loss: torch.Tensor, terms: dict[str, float]) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at iteration {self.state.it} (phase "
                                     f"{self.plan.phase}, epoch {self.state.epoch}); terms: {terms}")
        self.scaler.scale(loss).backward()

    # ------------------------------------------------------------------ loop
    def _windows(self, loader_iter: Iterator[CaptionBatch], remaining: int) -> Iterator[list[CaptionBatch]]:
        while remaining > 0:
            n = min(self.cfg.num_accum, remaining)
            window = [next(loader_iter) for _ in range(n)]
            remaining -= n
            yield window

    def train(self) -> LoopState:
        """Run (or continue) every remaining epoch; returns the final state."""
        state = self.state
        self.model.train()
        self._announce()
        if self.plan.eval_at_start and state.it == 0:  # the starting point counts: best.pth never scores below it
            self.evaluate()
        while state.epoch < self.cfg.num_epochs and not self._out_of_steps():
            self._run_epoch()
            if state.batch_in_epoch >= len(self.data.sampler):
                state.epoch += 1
                state.batch_in_epoch = 0
            self.evaluate()
            self.save()
        state.finished = True
        self.save()
        self._report_best()
        self.plot()
        self.log.close()
        return state

    def _out_of_steps(self) -> bool:
        return 0 < self.cfg.max_steps <= self.state.step

    def _announce(self) -> None:
        if self.dist.is_main:
            cfg, plan = self.cfg, self.plan
            eff = self.data.sampler.batch_size * self.dist.world * cfg.num_accum
            unit = "captions" if self.regime.unit == "caption" else "images"
            print(f"[{plan.phase}] {len(self.data.train)} train images, {len(self.data.sampler)} batches/epoch, "
                  f"effective batch {eff} {unit}, "
                  f"lr {plan.schedule.lr:g} ({plan.schedule.sched_type}), {cfg.num_epochs} epochs"
                  + (f" or {cfg.max_steps} steps, whichever comes first" if cfg.max_steps else "")
                  + f", run folder {plan.run_dir}",
                  flush=True)
            if not self.data.val:
                print(f"[{plan.phase}] no validation images: best.pth is not written; the last checkpoint "
                      f"({CHECKPOINT_GLOB}) is what later phases start from", flush=True)

    def _run_epoch(self) -> None:
        """The remaining windows of the current epoch, with logging, mid-epoch evaluation and timed saves."""
        state, cfg, sampler = self.state, self.cfg, self.data.sampler
        sampler.set_epoch(state.epoch, state.batch_in_epoch)
        loader_iter = iter(self.data.loader(sampler))
        bar = tqdm(total=len(sampler), initial=state.batch_in_epoch, desc=f"{self.plan.phase} epoch {state.epoch + 1}",
                   unit="it", disable=not self.dist.is_main, dynamic_ncols=True)
        sums: dict[str, float] = {}
        counted, lr = 0, 0.0
        for fetched in self._windows(loader_iter, len(sampler) - state.batch_in_epoch):
            lr, count = self._run_window(fetched, sums)
            counted += count
            before = state.it
            state.it += len(fetched)
            state.batch_in_epoch += len(fetched)
            state.step += 1
            bar.update(state.it - before)
            summary = self._summary(sums, counted, lr)
            bar.set_postfix({k: f"{v:.4g}" for k, v in summary.items() if k != "lr"} | {"lr": f"{lr:.2e}"})
            if state.it // cfg.print_every_iter != before // cfg.print_every_iter:
                self.log.row({"type": "train", "epoch": state.epoch, "it": state.it, **summary})
                sums, counted = {}, 0
            if cfg.eval_every_iter > 0 and state.it // cfg.eval_every_iter != before // cfg.eval_every_iter \
                    and state.batch_in_epoch < len(sampler):
                self.evaluate()
            if (time.monotonic() - self.last_save) / 60.0 >= cfg.save_every_minutes:
                self.save()
            if self._out_of_steps():
                break
        bar.close()
        if counted:
            self.log.row({"type": "train", "epoch": state.epoch, "it": state.it, **self._summary(sums, counted, lr)})
        if state.skipped_images and self.dist.is_main:
            print(f"[{self.plan.phase}] epoch {state.epoch + 1}: {state.skipped_images} unreadable images skipped so "
                  "far")

    def _run_window(self, fetched: list[CaptionBatch], sums: dict[str, float]) -> tuple[float, int]:
        """One optimizer step over an accumulation window; adds the step terms to sums; returns (lr, count)."""
        state = self.state
        state.skipped_images += sum(len(b.skipped) for b in fetched)
        window = [b.to(self.device) for b in fetched if len(b)]
        count = torch.tensor(float(sum(self.regime.count(b) for b in window)), device=self.device)
        total = float(all_reduce_sum(count).item())
        denom = max(total, 1.0) / self.dist.world
        lr = lr_at(state.it + len(fetched) - 1, self.plan.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        for i, b in enumerate(window):
            last = i == len(window) - 1
            with self.model.no_sync() if (self.dist.distributed and not last) else contextlib.nullcontext():
                terms = self.regime.step(self.step_context, b, denom)
            for key, val in terms.items():
                sums[key] = sums.get(key, 0.0) + val
        if window:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, int(count.item())

    def _report_best(self) -> None:
        """Say which checkpoint later phases get, and when validation never improved on the starting point."""
        if not self.dist.is_main or not self.data.val:
            return
        best = [r for r in self.log.rows() if r["type"] == "val" and r["cider"] == self.state.best_cider]
        if self.plan.eval_at_start and best and best[0]["it"] == 0:
            print(f"[{self.plan.phase}] note: validation CIDEr-D never rose above the starting point's "
                  f"{self.state.best_cider:.2f}, so best.pth still holds the starting weights", flush=True)

    def _summary(self, sums: dict[str, float], counted: int, lr: float) -> dict[str, float]:
        return {**self.regime.summary(sums, counted), "lr": lr} if counted else {"lr": lr}

    # ------------------------------------------------------------------ evaluation, saving, logs
    def evaluate(self) -> float | None:
        """Beam-search the val split at each eval beam size (fp32 like test.py, whatever precision training runs in);
        keeps best.pth by CIDEr-D of the first beam size."""
        cfg, state = self.cfg, self.state
        if not self.data.val:
            return None
        first = None
        for beam in cfg.eval_beam_sizes:
            preds, skipped = caption_records(self.raw, self.data.val, self.vocab, self.data.source, beam_size=beam,
                                             max_len=self.plan.eval_max_len, batch_size=cfg.eval_batch_size,
                                             device=self.device, rank=self.dist.rank,
                                             world=self.dist.world, num_workers=cfg.num_workers,
                                             desc=f"val beam {beam}")
            cider = quick_cider(preds, self.data.val)
            stats = caption_stats(list(preds.values()))
            self.log.row({"type": "val", "epoch": state.epoch, "it": state.it, "beam": beam, "cider": cider,
                          "mean_length": stats["mean_length"], "dangling_share": stats["dangling_share"],
                          "skipped": len(skipped)})
            self.log.captions(f"val/captions_beam{beam}", _sample_captions(preds, self.data.val), state.it)
            if self.dist.is_main:
                print(f"[{self.plan.phase}] val (it {state.it}, beam {beam}): CIDEr-D {cider:.2f}, mean length "
                      f"{stats['mean_length']:.1f}, dangling {100 * stats['dangling_share']:.1f}%", flush=True)
            first = cider if first is None else first
        if first is not None and first > state.best_cider:
            state.best_cider = first
            self.save(name="best.pth", rolling=False)
        self.model.train()
        return first

    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            "phase": self.plan.phase,
            "train_config": self.plan.run_config,
            "train_state": asdict(self.state),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "rng_state": rng_state(),
            **self.plan.checkpoint_extra,
        }

    def save(self, name: str | None = None, rolling: bool = True) -> None:
        """Atomic save into the run folder; only this run's rolling files are pruned."""
        self.last_save = time.monotonic()
        if not self.dist.is_main:
            return
        name = name or f"ckpt_e{self.state.epoch:03d}_it{self.state.it:09d}.pth"
        run_dir = self.plan.run_dir
        save_model_checkpoint(run_dir / name, self.model, self.model_config, self.vocab, **self.checkpoint_extra())
        if rolling:
            files = sorted(run_dir.glob(CHECKPOINT_GLOB))
            for old in files[:-max(self.cfg.how_many_checkpoints, 1)]:
                old.unlink()

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint of this run: optimizer, scaler, counters and RNG states."""
        self.state = LoopState(**ckpt["train_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        self.scaler.load_state_dict(ckpt["scaler_state_dict"])
        set_rng_state(ckpt["rng_state"])

    def plot(self) -> None:
        """The regime's training curve and the validation curves of this run as PNG."""
        if not self.dist.is_main:
            return
        rows, key = self.log.rows(), self.regime.curve
        series = {key: [(r["it"], r[key]) for r in rows if r["type"] == "train" and key in r]}
        for beam in self.cfg.eval_beam_sizes:
            series[f"val CIDEr-D (beam {beam})"] = [(r["it"], r["cider"]) for r in rows
                                                    if r["type"] == "val" and r["beam"] == beam]
        if any(series.values()):
            save_curves(series, self.plan.run_dir / "curves.png", title=self.plan.phase)


def _sample_captions(preds: dict[int, str], records: list[ImageRecord], count: int = 4) -> list[str]:
    """The first few validation images' captions beside a reference each, as markdown lines."""
    return [f"**{r.image_id}**: {preds[r.image_id]} *(reference: {r.captions[0]})*"
            for r in records if r.image_id in preds and r.captions][:count]
