"""Decoder state for incremental decoding: cross-attention keys/values once per image, and each decoder layer's
dynamic-expansion cache (models.dynamic_expansion: the cache types, their layouts and their steps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.dynamic_expansion import Ancestry, FixedExpansionCache, ForwardWeightsCache, PrefixExpansionCache


@dataclass
class CrossAttentionCache:
    """Keys/values (B, h, S, d_k) of the encoder memory (plus memory slots) and the additive key mask."""

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None


class DecoderCache:
    """Everything the decoder needs to process one more position for a batch of B images x `group` hypotheses.

    Cross-attention state is stored once per image (hypotheses of one image share it, and beam re-ordering never
    moves a hypothesis to another image). A re-ordering moves the Ancestry of forward-weights caches (a table of
    integers), or gathers the fixed-size caches' rows; training-mode caches never re-order.
    """

    def __init__(self, cross: list[CrossAttentionCache],
                 dyn: list[ForwardWeightsCache] | list[FixedExpansionCache] | list[PrefixExpansionCache],
                 group: int, max_len: int, ancestry: Ancestry | None = None, reorders: bool = True) -> None:
        self.cross = cross
        self.dyn = dyn
        self.group = group
        self.max_len = max_len
        self.reorders = reorders
        self.ancestry = ancestry
        self._positions: list[Ancestry] | list[FixedExpansionCache] | list[PrefixExpansionCache] = \
            [ancestry] if ancestry is not None else dyn

    @property
    def length(self) -> int:
        return self._positions[0].length

    @property
    def can_share_first_step(self) -> bool:
        """Whether the first step may run once per image (`share_first_step`): a beam's forward-weights caches."""
        return self.ancestry is not None and self.ancestry.group > 1

    def share_first_step(self) -> None:
        """The coming first step runs on one row per image, the group's hypotheses being one until the first
        re-ordering; the caches fill every hypothesis's slot from that row."""
        if not self.can_share_first_step:
            raise ValueError("only a beam's forward-weights caches (eval mode, eager, group > 1) run the first step "
                             "once per image")
        self.ancestry.share_first_step()

    def advance(self) -> None:
        for p in self._positions:
            p.advance()

    def reorder(self, index: torch.Tensor) -> None:
        """index (B*group,) of source rows, each within its own image's group."""
        if not self.reorders:
            raise RuntimeError("this decoder cache was made for a search that never re-orders (reorders=False)")
        for p in self._positions:
            p.reorder(index)
