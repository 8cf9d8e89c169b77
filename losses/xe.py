"""Label-smoothed cross-entropy, computed as the reference's KL divergence to a smoothed target."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LabelSmoothingLoss(nn.Module):
    """KL(smoothed target || softmax(logits)) summed over non-PAD targets.

    The target gives 1 - smoothing to the gold token and smoothing / (V - 1) to every other class (PAD included), as
    the reference does. Returns the summed loss and the number of non-PAD targets, so callers can normalise by a count
    that spans several processes or micro-batches.
    """

    def __init__(self, vocab_size: int, pad_idx: int, smoothing: float = 0.1) -> None:
        super().__init__()
        self.vocab_size, self.pad_idx, self.smoothing = vocab_size, pad_idx, smoothing
        self.confidence = 1.0 - smoothing
        self.other = smoothing / (vocab_size - 1)
        # sum over classes of t * log t for the smoothed target (a constant of the KL)
        ent = self.confidence * math.log(self.confidence) if self.confidence > 0 else 0.0
        ent += (vocab_size - 1) * self.other * math.log(self.other) if self.other > 0 else 0.0
        self.target_entropy_term = ent

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (N, T, V), targets (N, T) -> (summed loss, number of non-PAD targets)."""
        logp = F.log_softmax(logits.float(), dim=-1)
        valid = targets != self.pad_idx
        gold = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        # KL = sum_c t_c log t_c - sum_c t_c log p_c, with t = other everywhere except confidence at the gold token
        cross = self.other * logp.sum(-1) + (self.confidence - self.other) * gold
        per_token = self.target_entropy_term - cross
        return (per_token * valid).sum(), valid.sum()
