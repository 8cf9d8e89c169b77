"""Learning-rate schedules as pure functions of the iteration counter (every forward pass, as the reference)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("custom_warmup_anneal", "annealing", "fixed")


@dataclass(frozen=True)
class ScheduleConfig:
    sched_type: str
    lr: float
    warmup: int
    anneal_coeff: float
    anneal_every_epoch: float
    iters_per_epoch: int
    min_lr: float = 5e-7

    def __post_init__(self) -> None:
        if self.sched_type not in SCHEDULES:
            raise ValueError(f"--sched_type {self.sched_type!r} is not one of {SCHEDULES}")
        if self.iters_per_epoch <= 0:
            raise ValueError("iters_per_epoch must be positive")


def lr_at(it: int, cfg: ScheduleConfig) -> float:
    """The learning rate at iteration `it`.

    custom_warmup_anneal: max([it >= W] * min_lr, lr / max(W - it, 1) * anneal_coeff ** floor(it / (nb * every)))
    -- a hyperbolic warm-up to lr at W, then a step decay per `anneal_every_epoch` epochs, floored at min_lr.
    annealing: a linear warm-up times 0.8 ** floor(it / (nb * every)). fixed: lr.
    """
    if cfg.sched_type == "fixed":
        return cfg.lr
    steps = math.floor(it / (cfg.iters_per_epoch * cfg.anneal_every_epoch))
    if cfg.sched_type == "custom_warmup_anneal":
        value = cfg.lr / max(cfg.warmup - it, 1) * cfg.anneal_coeff ** steps
        floor = cfg.min_lr if it >= cfg.warmup else 0.0
        return max(floor, value)
    warm = min(1.0, (it + 1) / max(cfg.warmup, 1))
    return cfg.lr * warm * 0.8 ** steps


def warmup_flat_cosine(step: int, lr: float, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Phase 0's schedule (backbone pretraining): a linear warm-up over warmup_frac of the steps to lr, a flat
    stretch, then a cosine decay to zero over the last decay_frac of the steps."""
    warm = max(1, int(warmup_frac * total_steps))
    decay_start = (1 - decay_frac) * total_steps
    ramp = min(1.0, (step + 1) / warm)
    if step < decay_start:
        return lr * ramp
    progress = min(1.0, (step - decay_start) / max(1.0, total_steps - decay_start))
    return lr * ramp * 0.5 * (1 + math.cos(math.pi * progress))
