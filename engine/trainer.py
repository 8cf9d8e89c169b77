"""The training loop: XE or SCST steps over accumulation windows, evaluation, checkpoints, resume.

The step kind is chosen once per run (xe_step or scst_step); the loop itself knows nothing of it. Each window of
num_accum micro-batches is normalised by its total count (tokens or samples) over all processes, so accumulation and
DDP give exactly the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data.loaders import CaptionBatch, EpochBatchSampler, ImageSource
from data.records import ImageRecord
from data.vocab import Vocabulary, tokenize
from engine.checkpoints import CHECKPOINT_GLOB, save_model_checkpoint, unwrap
from engine.evaluate import caption_records, quick_cider
from eval.caption_stats import caption_stats
from eval.cider import CiderD
from losses import LabelSmoothingLoss, scst_loss, scst_rewards
from models import ModelConfig
from models.decoding import compiled, sample
from optims import ScheduleConfig, lr_at
from utils.dist import DistInfo, all_reduce_sum
from utils.plots import save_curves
from utils.runtime import autocast


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs from the run config (train.py builds it)."""

    reinforce: bool
    num_epochs: int
    num_accum: int
    schedule: ScheduleConfig
    precision: str
    eval_beam_sizes: tuple[int, ...]
    eval_every_iter: int
    eval_batch_size: int
    eval_max_len: int
    print_every_iter: int
    save_every_minutes: float
    how_many_checkpoints: int
    run_dir: Path
    phase: str
    scst_samples: int = 5
    scst_max_len: int = 20
    label_smoothing: float = 0.1
    num_workers: int = 0
    eval_at_start: bool = False
    grouped: bool = False
    max_steps: int = 0  # 0: every epoch; else stop after this many optimizer steps


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


def scst_words(tokens: list[int], vocab: Vocabulary) -> str:
    """A sampled caption as the reward sees it: its words with EOS kept (as the token 'EOS'), SOS and PAD dropped."""
    out = []
    for t in tokens:
        if t == vocab.pad_idx:
            break
        out.append(vocab.tokens[t])
        if t == vocab.eos_idx:
            break
    return " ".join(out)


def reward_reference(caption: str) -> str:
    """A reference as the reward sees it: tokenised like training, with EOS appended."""
    return " ".join(tokenize(caption) + ["EOS"])


class Trainer:
    """Runs one phase: owns the optimizer, scaler, sampler and state; the model may be DDP-wrapped."""

    def __init__(self, model: nn.Module, config: ModelConfig, vocab: Vocabulary, optimizer: torch.optim.Optimizer,
                 train_records: list[ImageRecord], val_records: list[ImageRecord], source: ImageSource,
                 loader_factory: Callable[[EpochBatchSampler], Any], sampler: EpochBatchSampler,
                 settings: LoopSettings, dist: DistInfo, run_config: dict[str, Any], extra_ckpt: dict[str, Any]):
        self.model, self.config, self.vocab, self.optimizer = model, config, vocab, optimizer
        self.raw = unwrap(model)
        self.train_records, self.val_records, self.source = train_records, val_records, source
        self.loader_factory, self.sampler, self.settings, self.dist = loader_factory, sampler, settings, dist
        self.run_config, self.extra_ckpt = run_config, extra_ckpt
        self.device = dist.device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        self.state = LoopState()
        self.xe_loss = LabelSmoothingLoss(config.vocab_size, vocab.pad_idx, settings.label_smoothing)
        self.cider: CiderD | None = None
        if settings.reinforce:
            self.cider = CiderD(df_refs=[[reward_reference(c) for c in r.captions] for r in train_records])
        # under torch.compile (train.py --compile True) SCST's encoder, sampling steps and re-scoring pass run
        # compiled too: the trainer calls them on the raw model, which the compiled wrapper would not reach
        self.compiled = is_compiled(model)
        self.log_path = settings.run_dir / "metrics.jsonl"
        self.sampler_unit = "image" if settings.reinforce or settings.grouped else "caption"
        self.last_save = time.monotonic()

    # ------------------------------------------------------------------ steps
    def xe_step(self, batch: CaptionBatch, denom: float) -> dict[str, float]:
        """Teacher-forced label-smoothed XE; the summed loss is divided by the window's token count."""
        inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
        with autocast(self.device, self.settings.precision):
            logits = self.model(inputs, features=batch.features, images=batch.images,
                                caption_index=batch.caption_index)
        loss_sum, _ = self.xe_loss(logits, targets)
        terms = {"loss_sum": loss_sum.item()}
        self._backward(loss_sum / denom, terms)
        return terms

    def scst_step(self, batch: CaptionBatch, denom: float) -> dict[str, float]:
        """Sample k captions per image without gradient (cached decoder, dropout on), reward them with CIDEr-D
        (EOS counted, leave-one-out baseline), then re-score them in one teacher-forced pass with gradient."""
        v, k = self.vocab, self.settings.scst_samples
        reuse = not self.dist.distributed  # under DDP the gradient pass must go through the wrapper's forward
        with autocast(self.device, self.settings.precision), torch.set_grad_enabled(reuse):
            memory = self._raw_call("encode", features=batch.features, images=batch.images)
            out = sample(self.raw, memory.detach(), None, sos_idx=v.sos_idx, eos_idx=v.eos_idx, pad_idx=v.pad_idx,
                         num_samples=k, max_len=self.settings.scst_max_len, compile=self.compiled)
        tokens = out.tokens.flatten(0, 1)  # (B*k, L)
        lengths = out.lengths.flatten()
        rows = tokens.cpu().tolist()
        hyps = [scst_words(t, v) for t in rows]
        per_image = [[reward_reference(c) for c in caps] for caps in batch.refs]
        refs = [r for r in per_image for _ in range(k)]
        rewards, baseline = scst_rewards(self.cider, hyps, refs, k)
        inputs = torch.cat([torch.full_like(tokens[:, :1], v.sos_idx), tokens[:, :-1]], dim=1)
        image_index = torch.arange(len(batch), device=self.device).repeat_interleave(k)
        with autocast(self.device, self.settings.precision):
            if reuse:
                logits = self._raw_call("decode", inputs, memory, caption_index=image_index)
            else:
                logits = self.model(inputs, features=batch.features, images=batch.images, caption_index=image_index)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        mask = (torch.arange(tokens.shape[1], device=self.device)[None, :] < lengths[:, None]).float()
        loss = scst_loss(logp, mask, rewards, baseline) * (len(rows) / denom)
        self._backward(loss, {"reward": rewards.mean().item()})
        texts = [v.decode(t) for t in rows]
        stats = caption_stats(texts)
        return {"reward_sum": rewards.sum().item(), "baseline_sum": baseline.sum().item(),
                "length_sum": float(sum(len(t.split()) for t in texts)),
                "dangling_sum": stats["dangling_share"] * len(texts)}

    def _raw_call(self, method: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The raw model's encode or decode, compiled when the run compiles its model."""
        if self.compiled:
            return compiled(method, True)(self.raw, *args, **kwargs)
        return getattr(self.raw, method)(*args, **kwargs)

    def _backward(self, loss: torch.Tensor, terms: dict[str, float]) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at iteration {self.state.it} (phase "
                                     f"{self.settings.phase}, epoch {self.state.epoch}); terms: {terms}")
        self.scaler.scale(loss).backward()

    def _count(self, batch: CaptionBatch) -> int:
        if self.settings.reinforce:
            return len(batch) * self.settings.scst_samples
        return int((batch.tokens[:, 1:] != self.vocab.pad_idx).sum())

    # ------------------------------------------------------------------ loop
    def _windows(self, loader_iter: Iterator[CaptionBatch], remaining: int) -> Iterator[list[CaptionBatch]]:
        while remaining > 0:
            n = min(self.settings.num_accum, remaining)
            window = [next(loader_iter) for _ in range(n)]
            remaining -= n
            yield window

    def train(self) -> LoopState:
        """Run (or continue) every remaining epoch; returns the final state."""
        state, s = self.state, self.settings
        self.model.train()
        self._announce()
        if s.eval_at_start and state.it == 0:  # the starting point counts: best.pth never scores below it
            self.evaluate()
        while state.epoch < s.num_epochs and not self._out_of_steps():
            self._run_epoch()
            if state.batch_in_epoch >= len(self.sampler):
                state.epoch += 1
                state.batch_in_epoch = 0
            self.evaluate()
            self.save()
        state.finished = True
        self.save()
        self._report_best()
        self.plot()
        return state

    def _out_of_steps(self) -> bool:
        return 0 < self.settings.max_steps <= self.state.step

    def _announce(self) -> None:
        if self.dist.is_main:
            s = self.settings
            eff = self.sampler.batch_size * self.dist.world * s.num_accum
            unit = "captions" if self.sampler_unit == "caption" else "images"
            print(f"[{s.phase}] {len(self.train_records)} train images, {len(self.sampler)} batches/epoch, "
                  f"effective batch {eff} {unit}, "
                  f"lr {s.schedule.lr:g} ({s.schedule.sched_type}), {s.num_epochs} epochs"
                  + (f" or {s.max_steps} steps, whichever comes first" if s.max_steps else "")
                  + f", run folder {s.run_dir}",
                  flush=True)
            if not self.val_records:
                print(f"[{s.phase}] no validation images: best.pth is not written; the last checkpoint "
                      f"({CHECKPOINT_GLOB}) is what later phases start from", flush=True)

    def _run_epoch(self) -> None:
        """The remaining windows of the current epoch, with logging, mid-epoch evaluation and timed saves."""
        state, s = self.state, self.settings
        self.sampler.set_epoch(state.epoch, state.batch_in_epoch)
        loader_iter = iter(self.loader_factory(self.sampler))
        bar = tqdm(total=len(self.sampler), initial=state.batch_in_epoch, desc=f"{s.phase} epoch {state.epoch + 1}",
                   unit="it", disable=not self.dist.is_main, dynamic_ncols=True)
        sums: dict[str, float] = {}
        counted, lr = 0, 0.0
        for fetched in self._windows(loader_iter, len(self.sampler) - state.batch_in_epoch):
            lr, count = self._run_window(fetched, sums)
            counted += count
            before = state.it
            state.it += len(fetched)
            state.batch_in_epoch += len(fetched)
            state.step += 1
            bar.update(state.it - before)
            summary = self._summary(sums, counted, lr)
            bar.set_postfix({k: f"{v:.4g}" for k, v in summary.items() if k != "lr"} | {"lr": f"{lr:.2e}"})
            if state.it // s.print_every_iter != before // s.print_every_iter:
                self._log({"type": "train", "epoch": state.epoch, "it": state.it, **summary})
                sums, counted = {}, 0
            if s.eval_every_iter > 0 and state.it // s.eval_every_iter != before // s.eval_every_iter \
                    and state.batch_in_epoch < len(self.sampler):
                self.evaluate()
            if (time.monotonic() - self.last_save) / 60.0 >= s.save_every_minutes:
                self.save()
            if self._out_of_steps():
                break
        bar.close()
        if counted:
            self._log({"type": "train", "epoch": state.epoch, "it": state.it, **self._summary(sums, counted, lr)})
        if state.skipped_images and self.dist.is_main:
            print(f"[{s.phase}] epoch {state.epoch + 1}: {state.skipped_images} unreadable images skipped so far")

    def _run_window(self, fetched: list[CaptionBatch], sums: dict[str, float]) -> tuple[float, int]:
        """One optimizer step over an accumulation window; adds the step terms to sums; returns (lr, count)."""
        state = self.state
        step_fn = self.scst_step if self.settings.reinforce else self.xe_step
        state.skipped_images += sum(len(b.skipped) for b in fetched)
        window = [b.to(self.device) for b in fetched if len(b)]
        count = torch.tensor(float(sum(self._count(b) for b in window)), device=self.device)
        total = float(all_reduce_sum(count).item())
        denom = max(total, 1.0) / self.dist.world
        lr = lr_at(state.it + len(fetched) - 1, self.settings.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        for i, b in enumerate(window):
            last = i == len(window) - 1
            with self.model.no_sync() if (self.dist.distributed and not last) else contextlib.nullcontext():
                terms = step_fn(b, denom)
            for key, val in terms.items():
                sums[key] = sums.get(key, 0.0) + val
        if window:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, int(count.item())

    def _report_best(self) -> None:
        """Say which checkpoint later phases get, and when validation never improved on the starting point."""
        if not self.dist.is_main or not self.val_records:
            return
        rows = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        best = [r for r in rows if r["type"] == "val" and r["cider"] == self.state.best_cider]
        if self.settings.eval_at_start and best and best[0]["it"] == 0:
            print(f"[{self.settings.phase}] note: validation CIDEr-D never rose above the starting point's "
                  f"{self.state.best_cider:.2f}, so best.pth still holds the starting weights", flush=True)

    def _summary(self, sums: dict[str, float], counted: int, lr: float) -> dict[str, float]:
        if not counted:
            return {"lr": lr}
        if self.settings.reinforce:
            return {"reward": sums.get("reward_sum", 0) / counted, "baseline": sums.get("baseline_sum", 0) / counted,
                    "mean_length": sums.get("length_sum", 0) / counted,
                    "dangling_share": sums.get("dangling_sum", 0) / counted, "lr": lr}
        return {"loss": sums.get("loss_sum", 0) / counted, "lr": lr}

    # ------------------------------------------------------------------ evaluation, saving, logs
    def evaluate(self) -> float | None:
        """Beam-search the val split at each eval beam size; keeps best.pth by CIDEr-D of the first beam size."""
        s, state = self.settings, self.state
        if not self.val_records:
            return None
        first = None
        for beam in s.eval_beam_sizes:
            preds, skipped = caption_records(self.raw, self.val_records, self.vocab, self.source, beam_size=beam,
                                             max_len=s.eval_max_len, batch_size=s.eval_batch_size, device=self.device,
                                             precision=s.precision, rank=self.dist.rank, world=self.dist.world,
                                             num_workers=s.num_workers, desc=f"val beam {beam}")
            cider = quick_cider(preds, self.val_records)
            stats = caption_stats(list(preds.values()))
            self._log({"type": "val", "epoch": state.epoch, "it": state.it, "beam": beam, "cider": cider,
                       "mean_length": stats["mean_length"], "dangling_share": stats["dangling_share"],
                       "skipped": len(skipped)})
            if self.dist.is_main:
                print(f"[{s.phase}] val (it {state.it}, beam {beam}): CIDEr-D {cider:.2f}, mean length "
                      f"{stats['mean_length']:.1f}, dangling {100 * stats['dangling_share']:.1f}%", flush=True)
            first = cider if first is None else first
        if first is not None and first > state.best_cider:
            state.best_cider = first
            self.save(name="best.pth", rolling=False)
        self.model.train()
        return first

    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            "phase": self.settings.phase,
            "train_config": self.run_config,
            "train_state": asdict(self.state),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "rng_state": rng_state(),
            **self.extra_ckpt,
        }

    def save(self, name: str | None = None, rolling: bool = True) -> None:
        """Atomic save into the run folder; only this run's rolling files are pruned."""
        self.last_save = time.monotonic()
        if not self.dist.is_main:
            return
        name = name or f"ckpt_e{self.state.epoch:03d}_it{self.state.it:09d}.pth"
        run_dir = self.settings.run_dir
        save_model_checkpoint(run_dir / name, self.model, self.config, self.vocab, **self.checkpoint_extra())
        if rolling:
            files = sorted(run_dir.glob(CHECKPOINT_GLOB))
            for old in files[:-max(self.settings.how_many_checkpoints, 1)]:
                old.unlink()

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint of this run: optimizer, scaler, counters and RNG states."""
        self.state = LoopState(**ckpt["train_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        self.scaler.load_state_dict(ckpt["scaler_state_dict"])
        set_rng_state(ckpt["rng_state"])

    def _log(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        row = {"phase": self.settings.phase, "time": time.time(), **row}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        """Loss/reward and validation curves of this run as PNG."""
        if not self.dist.is_main or not self.log_path.exists():
            return
        rows = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        key = "reward" if self.settings.reinforce else "loss"
        series = {key: [(r["it"], r[key]) for r in rows if r["type"] == "train" and key in r]}
        for beam in self.settings.eval_beam_sizes:
            series[f"val CIDEr-D (beam {beam})"] = [(r["it"], r["cider"]) for r in rows
                                                    if r["type"] == "val" and r["beam"] == beam]
        if any(series.values()):
            save_curves(series, self.settings.run_dir / "curves.png", title=self.settings.phase)
