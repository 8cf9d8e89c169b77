"""Self-critical sequence training: CIDEr-D rewards with a leave-one-out baseline, and the policy-gradient loss."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from eval.cider import CiderD


def scst_rewards(scorer: CiderD, hyps: Sequence[str], refs: Sequence[Sequence[str]], num_samples: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """CIDEr-D rewards (B*k,) for k samples per image and the baseline: the mean of the image's other samples."""
    _, scores = scorer.score(list(hyps), [list(r) for r in refs])
    rewards = torch.as_tensor(np.asarray(scores, dtype=np.float64), dtype=torch.float32).view(-1, num_samples)
    if num_samples > 1:
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (num_samples - 1)
    else:
        baseline = torch.zeros_like(rewards)
    return rewards.view(-1), baseline.view(-1)


def scst_loss(seq_logprobs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
              baseline: torch.Tensor) -> torch.Tensor:
    """mean over samples of -(r - b) * sum_t log p(w_t): seq_logprobs (N, L) per token, mask (N, L) up to EOS."""
    advantage = (rewards - baseline).to(seq_logprobs.device)
    return -(advantage * (seq_logprobs * mask).sum(-1)).mean()
