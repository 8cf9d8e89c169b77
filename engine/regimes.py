"""Training regimes: what one micro-batch of cross-entropy or self-critical (SCST) training computes, counts and
reports. The loop in engine/trainer.py runs either one without knowing which (windows, schedule, evaluation,
checkpoints); a new regime is one class here and one line in `build_regime`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.loaders import CaptionBatch
from data.records import ImageRecord
from data.vocab import Vocabulary, tokenize
from eval.caption_stats import caption_stats
from eval.cider import CiderD
from losses import LabelSmoothingLoss, scst_loss, scst_rewards
from models.decoding import compiled, sample
from utils.runtime import autocast

LABEL_SMOOTHING = 0.1  # the reference's


@dataclass(frozen=True)
class StepContext:
    """What a regime's step needs from the loop: the model as the optimizer trains it (possibly compiled and DDP
    wrapped) and unwrapped, where and how to compute, and the loop's backward (loss scaling, non-finite checks)."""

    model: nn.Module
    raw: nn.Module
    device: torch.device
    precision: str
    compiled: bool
    distributed: bool
    backward: Callable[[torch.Tensor, dict[str, float]], None]

    def raw_call(self, method: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The raw model's encode or decode, compiled when the run compiles its model (the compiled wrapper only
        reaches forward)."""
        if self.compiled:
            return compiled(method, True)(self.raw, *args, **kwargs)
        return getattr(self.raw, method)(*args, **kwargs)


class Regime(ABC):
    """One way of training: its step over a micro-batch, what an accumulation window is normalised by, the running
    figures it logs and the curve it draws."""

    unit: str  # what the sampler draws: "caption" (one image-caption pair) or "image" (an image and its captions)
    curve: str  # the training figure drawn in curves.png

    @abstractmethod
    def count(self, batch: CaptionBatch) -> int:
        """What this batch adds to its window's normaliser (tokens or samples)."""

    @abstractmethod
    def step(self, ctx: StepContext, batch: CaptionBatch, denom: float) -> dict[str, float]:
        """Forward and backward of one micro-batch, the loss divided by `denom`; returns summed terms for the log."""

    @abstractmethod
    def summary(self, sums: dict[str, float], counted: int) -> dict[str, float]:
        """The running figures of the log from summed terms over `counted` units."""


class CrossEntropy(Regime):
    """Teacher-forced label-smoothed cross-entropy, the summed loss divided by the window's token count."""

    curve = "loss"

    def __init__(self, vocab_size: int, pad_idx: int, grouped: bool) -> None:
        self.loss = LabelSmoothingLoss(vocab_size, pad_idx, LABEL_SMOOTHING)
        self.pad_idx = pad_idx
        self.unit = "image" if grouped else "caption"  # grouped: all captions of an image in one batch

    def count(self, batch: CaptionBatch) -> int:
        return int((batch.tokens[:, 1:] != self.pad_idx).sum())

    def step(self, ctx: StepContext, batch: CaptionBatch, denom: float) -> dict[str, float]:
        inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
        with autocast(ctx.device, ctx.precision):
            logits = ctx.model(inputs, features=batch.features, images=batch.images,
                               caption_index=batch.caption_index)
        loss_sum, _ = self.loss(logits, targets)
        terms = {"loss_sum": loss_sum.item()}
        ctx.backward(loss_sum / denom, terms)
        return terms

    def summary(self, sums: dict[str, float], counted: int) -> dict[str, float]:
        return {"loss": sums.get("loss_sum", 0.0) / counted}


class SelfCritical(Regime):
    """SCST: sample k captions per image without gradient (cached decoder, dropout on), reward them with CIDEr-D
    (EOS counted, leave-one-out baseline), then re-score them in one teacher-forced pass with gradient."""

    unit = "image"
    curve = "reward"

    def __init__(self, vocab: Vocabulary, train_records: Sequence[ImageRecord], samples: int, max_len: int) -> None:
        self.vocab, self.samples, self.max_len = vocab, samples, max_len
        self.cider = CiderD(df_refs=[[reward_reference(c) for c in r.captions] for r in train_records])

    def count(self, batch: CaptionBatch) -> int:
        return len(batch) * self.samples

    def step(self, ctx: StepContext, batch: CaptionBatch, denom: float) -> dict[str, float]:
        v, k = self.vocab, self.samples
        reuse = not ctx.distributed  # under DDP the gradient pass must go through the wrapper's forward
        with autocast(ctx.device, ctx.precision), torch.set_grad_enabled(reuse):
            memory = ctx.raw_call("encode", features=batch.features, images=batch.images)
            out = sample(ctx.raw, memory.detach(), None, sos_idx=v.sos_idx, eos_idx=v.eos_idx, pad_idx=v.pad_idx,
                         num_samples=k, max_len=self.max_len, compile=ctx.compiled)
        tokens = out.tokens.flatten(0, 1)  # (B*k, L)
        lengths = out.lengths.flatten()
        rows = tokens.cpu().tolist()
        hyps = [scst_words(t, v) for t in rows]
        per_image = [[reward_reference(c) for c in caps] for caps in batch.refs]
        rewards, baseline = scst_rewards(self.cider, hyps, [r for r in per_image for _ in range(k)], k)
        inputs = torch.cat([torch.full_like(tokens[:, :1], v.sos_idx), tokens[:, :-1]], dim=1)
        image_index = torch.arange(len(batch), device=ctx.device).repeat_interleave(k)
        with autocast(ctx.device, ctx.precision):
            if reuse:
                logits = ctx.raw_call("decode", inputs, memory, caption_index=image_index)
            else:
                logits = ctx.model(inputs, features=batch.features, images=batch.images, caption_index=image_index)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        mask = (torch.arange(tokens.shape[1], device=ctx.device)[None, :] < lengths[:, None]).float()
        ctx.backward(scst_loss(logp, mask, rewards, baseline) * (len(rows) / denom),
                     {"reward": rewards.mean().item()})
        texts = [v.decode(t) for t in rows]
        return {"reward_sum": rewards.sum().item(), "baseline_sum": baseline.sum().item(),
                "length_sum": float(sum(len(t.split()) for t in texts)),
                "dangling_sum": caption_stats(texts)["dangling_share"] * len(texts)}

    def summary(self, sums: dict[str, float], counted: int) -> dict[str, float]:
        return {"reward": sums.get("reward_sum", 0.0) / counted, "baseline": sums.get("baseline_sum", 0.0) / counted,
                "mean_length": sums.get("length_sum", 0.0) / counted,
                "dangling_share": sums.get("dangling_sum", 0.0) / counted}


def build_regime(reinforce: bool, *, vocab: Vocabulary, vocab_size: int, train_records: Sequence[ImageRecord],
                 grouped: bool = False, scst_samples: int = 5, scst_max_len: int = 20) -> Regime:
    """The run's regime: SCST with --reinforce True, cross-entropy otherwise."""
    if reinforce:
        return SelfCritical(vocab, train_records, scst_samples, scst_max_len)
    return CrossEntropy(vocab_size, vocab.pad_idx, grouped)


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
