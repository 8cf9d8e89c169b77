"""Optimizers and learning-rate schedules (pure functions of the iteration)."""

from optims.builder import build_optimizer
from optims.schedule import ScheduleConfig, lr_at

__all__ = ["ScheduleConfig", "build_optimizer", "lr_at"]
