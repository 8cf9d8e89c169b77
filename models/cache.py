"""Decoder state for incremental decoding: per-layer dynamic-expansion caches and cross-attention keys/values."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DynamicExpansionCache:
    """Per-layer state of the dynamic expansion, preallocated to max_len positions.

    For every past position it keeps K, Va, Vb (D each) and its E expanded rows: queries Qe and the forward-step
    outputs plus biases Ca+Be, Cb+Be (E x D each). Those rows never change once written (the forward step is causal).
    """

    def __init__(self, batch: int, max_len: int, num_exp: int, d_model: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        kw = {"device": device, "dtype": dtype}
        self.k = torch.zeros(batch, max_len, d_model, **kw)
        self.va = torch.zeros(batch, max_len, d_model, **kw)
        self.vb = torch.zeros(batch, max_len, d_model, **kw)
        self.qe = torch.zeros(batch, max_len * num_exp, d_model, **kw)
        self.ca_be = torch.zeros(batch, max_len * num_exp, d_model, **kw)
        self.cb_be = torch.zeros(batch, max_len * num_exp, d_model, **kw)
        self.num_exp = num_exp
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Gather rows along the batch axis (beam re-ordering); only the filled prefix is copied."""
        j, n = self.length, self.length * self.num_exp
        for name, filled in (("k", j), ("va", j), ("vb", j), ("qe", n), ("ca_be", n), ("cb_be", n)):
            t = getattr(self, name)
            t[:, :filled] = t[:, :filled].index_select(0, index)


@dataclass
class CrossAttentionCache:
    """Keys/values (B, h, S, d_k) of the encoder memory (plus memory slots) and the additive key mask."""

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None


class DecoderCache:
    """Everything the decoder needs to process one more position for a batch of B images x `group` hypotheses.

    Cross-attention state is stored once per image (hypotheses of one image share it, and beam re-ordering never
    moves a hypothesis to another image), so only the dynamic-expansion caches are gathered on reorder.
    """

    def __init__(self, cross: list[CrossAttentionCache], dyn: list[DynamicExpansionCache], group: int,
                 max_len: int) -> None:
        self.cross = cross
        self.dyn = dyn
        self.group = group
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.dyn[0].length

    def advance(self) -> None:
        for c in self.dyn:
            c.length += 1

    def reorder(self, index: torch.Tensor) -> None:
        """index (B*group,) of source rows, each within its own image's group."""
        for c in self.dyn:
            c.reorder(index)
