"""Training losses: label-smoothed cross-entropy and the self-critical (SCST) policy-gradient loss."""

from losses.scst import scst_loss, scst_rewards
from losses.xe import LabelSmoothingLoss

__all__ = ["LabelSmoothingLoss", "scst_loss", "scst_rewards"]
