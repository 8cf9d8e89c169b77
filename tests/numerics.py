"""Tolerances for two float32 computations of one quantity, from float32 analysis rather than from one machine's result.

Two evaluations that are equal in exact arithmetic but sum in another order (another CPU's kernels, another thread
count, batch shape or association) differ by rounding alone. Each float32 operation rounds its result by at most
EPS32 / 2 relative to its operands' magnitude, so an element that took R dependent roundings (a dot product of n terms
counts n) of values no larger than S is off by at most about R * EPS32 * S (Higham, "Accuracy and Stability of
Numerical Algorithms", ch. 3). S is the largest magnitude in the compared tensor, not the element's own: an element
near zero is a cancellation of terms as large as the others, so a tolerance relative to the element itself fails on
machines that cancel in another order (issue 21). A mistake in a formula moves values by a sizeable part of S, orders
of magnitude above these bounds, so the tests still catch it.
"""
from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23, the spacing of float32 numbers in [1, 2)

# Budgets of dependent roundings R for the tests' own small networks. Worst-case bounds (n roundings for n terms) where
# typical errors grow like sqrt(n), so each also covers the few-fold amplification of an error by the layers after it.
# One layer of width <= 32: products of <= 32 terms, <= 8 dependent operations per element.
BLOCK_ROUNDINGS = 256
# A tiny captioner (width 32, FF 64, <= 3 + 3 layers): products of <= 64 terms, <= 32 of them in a chain.
TINY_MODEL_ROUNDINGS = 2048
# The same behind the tests' tiny SwinV2 backbone (2 stages of width <= 32).
TINY_E2E_ROUNDINGS = 2 * TINY_MODEL_ROUNDINGS
# The seed's captioner at full size (width 512, FF 2048, 10,000 words, products of <= 2048 terms): here the worst case
# (2048 x 32 roundings) says little, so the probabilistic bound (errors grow like sqrt(n): 45 x 32), with a margin of 4
SEED_MODEL_ROUNDINGS = 8192


def float32_atol(reference: torch.Tensor | float, roundings: int) -> float:
    """The absolute tolerance for ``roundings`` dependent float32 roundings of values as large as ``reference``'s."""
    if isinstance(reference, torch.Tensor):
        finite = reference.detach().float().abs()
        finite = finite[torch.isfinite(finite)]  # -inf log-probabilities of finished or impossible words
        scale = finite.max().item() if finite.numel() else 0.0
    else:
        scale = abs(reference)
    return roundings * EPS32 * max(scale, torch.finfo(torch.float32).tiny)


def assert_close_f32(actual: torch.Tensor, expected: torch.Tensor, *, roundings: int,
                     scale: torch.Tensor | float | None = None, msg: str | None = None) -> None:
    """Assert that two float32 computations of the same exact value differ by no more than rounding: each element
    within ``roundings * EPS32 * S``, S the largest magnitude of ``scale`` (default: of ``expected``)."""
    atol = float32_atol(expected if scale is None else scale, roundings)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=msg)



def linear_error_scale(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """|x| |W|^T (+ |b|): the magnitudes whose sum bounds a float32 linear layer's rounding error elementwise (Higham's
    |fl(w . x) - w . x| <= gamma_n sum_i |w_i x_i|, n the input width); two kernels differ by at most twice that, so
    roundings=2 * (n + 1) with this scale is a worst-case bound, not a tuned one."""
    magnitudes = x.detach().abs() @ weight.detach().abs().T
    return magnitudes + bias.detach().abs() if bias is not None else magnitudes
