"""Optimizers and learning-rate schedules (pure functions of the iteration)."""

from optims.builder import OPTIMIZERS, build_optimizer
from optims.schedule import SCHEDULES, ScheduleConfig, lr_at, warmup_flat_cosine

__all__ = ["OPTIMIZERS", "SCHEDULES", "ScheduleConfig", "build_optimizer", "lr_at", "warmup_flat_cosine"]
