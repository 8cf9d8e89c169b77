"""The optimizers of the recipe: RAdam (betas 0.9/0.98, eps 1e-9) or Adam."""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("radam", "adam")


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_type: str, lr: float) -> torch.optim.Optimizer:
    """torch's RAdam with the reference's betas and eps (its first steps use the un-rectified update, documented in
    README), or Adam with default betas. The lr is overwritten every iteration by the schedule."""
    params = [p for p in params if p.requires_grad]
    if optim_type == "radam":
        return torch.optim.RAdam(params, lr=lr, betas=(0.9, 0.98), eps=1e-9, foreach=True)
    if optim_type == "adam":
        return torch.optim.Adam(params, lr=lr, foreach=True)
    raise ValueError(f"--optim_type {optim_type!r} is not one of {OPTIMIZERS}")
