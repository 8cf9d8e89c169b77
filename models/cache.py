"""Decoder state for incremental decoding: per-layer dynamic-expansion caches and cross-attention keys/values."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DynamicExpansionCache:
    """Per-layer state of the dynamic expansion, preallocated to max_len positions.

    For every past position it keeps K, Va, Vb and the conditioning vector cond (D each), and the forward-step
    outputs Ca, Cb of its E expanded rows (E x D each), which never change once written (the forward step is causal).
    Expanded queries and biases are not stored: they are q_exp[e] + cond_t and b_exp[e] + cond_t.
    Every buffer has a spare twin so that a beam re-ordering is one gather into the spare and a swap.

    Buffers are batch-major, (batch, rows, D). A position-major layout (rows, batch, D), whose filled prefix is
    contiguous, was measured too: 20% slower on a quiet 2-core machine (strided matrix products), though its gather
    degrades far less when the cores are oversubscribed (docs/benchmarks.md, "Decoding").
    """

    NAMES = ("k", "va", "vb", "cond", "ca", "cb")

    def __init__(self, batch: int, max_len: int, num_exp: int, d_model: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        kw = {"device": device, "dtype": dtype}
        rows = {"k": max_len, "va": max_len, "vb": max_len, "cond": max_len, "ca": max_len * num_exp,
                "cb": max_len * num_exp}
        # uninitialised: only the written prefix is ever read (zero-filling them was 5% of a beam search)
        self._buffers = {name: torch.empty(batch, n, d_model, **kw) for name, n in rows.items()}
        self._spares = {name: torch.empty(batch, n, d_model, **kw) for name, n in rows.items()}
        self.num_exp = num_exp
        self.length = 0

    def append(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Write the newest position's rows (B, n, D) after the filled prefix; return the whole filled buffer.

        n is 1 for k, va, vb and cond and num_exp for ca and cb; `length` moves on in DecoderCache.advance.
        """
        start = self.length * rows.shape[1]
        buf = self._buffers[name]
        buf[:, start:start + rows.shape[1]] = rows
        return buf[:, :start + rows.shape[1]]

    def hide_unwritten(self, scores: torch.Tensor, rows_per_position: int) -> torch.Tensor:
        """Scores (..., rows) against the buffer `append` returned, unchanged: every row of it is written."""
        return scores

    def advance(self) -> None:
        self.length += 1

    def reorder(self, index: torch.Tensor) -> None:
        """Gather rows along the batch axis (beam re-ordering): the filled prefix, into the spare buffers."""
        for name in self.NAMES:
            filled = self.length * (self.num_exp if name in ("ca", "cb") else 1)
            src, dst = self._buffers[name], self._spares[name]
            torch.index_select(src[:, :filled], 0, index, out=dst[:, :filled])
            self._buffers[name], self._spares[name] = dst, src


class FixedExpansionCache(DynamicExpansionCache):
    """The same state in buffers whose shapes never change, for a compiled decoding step (torch.compile).

    `append` writes the newest position at `position` (a tensor, not a Python int) and returns the whole max_len
    buffer; `hide_unwritten` zeroes the scores of the positions not written yet. A compiled step therefore sees the
    same shapes and the same Python values at every position and compiles once, where the growing prefix of
    DynamicExpansionCache gives it a new shape (and a recompilation) at every step. The rows beyond the written
    positions are zeros (both twins start zeroed, and a re-ordering copies the written prefix only), so masked
    scores meet finite values. Eager decoding keeps DynamicExpansionCache: reading the unwritten positions too costs
    up to twice the expansion arithmetic.
    """

    def __init__(self, batch: int, max_len: int, num_exp: int, d_model: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__(batch, max_len, num_exp, d_model, device, dtype)
        self._buffers = {name: torch.zeros_like(buf) for name, buf in self._buffers.items()}
        self._spares = {name: torch.zeros_like(buf) for name, buf in self._buffers.items()}
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # (1,): dynamo would make a 0-d one an int

    def append(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Write rows (B, n, D) at `position`; return the whole buffer (B, max_len * n, D)."""
        n = rows.shape[1]
        buf = self._buffers[name]
        index = self.position * n + torch.arange(n, device=buf.device)
        buf.index_copy_(1, index, rows.to(buf.dtype))
        return buf

    def hide_unwritten(self, scores: torch.Tensor, rows_per_position: int) -> torch.Tensor:
        """Scores (..., max_len * rows_per_position) with the rows of positions after `position` set to zero."""
        rows = torch.arange(scores.shape[-1], device=scores.device)
        return scores.masked_fill(rows >= (self.position + 1) * rows_per_position, 0.0)

    def advance(self) -> None:
        super().advance()
        self.position.fill_(self.length)


class ConcatExpansionCache:
    """The same per-layer state as DynamicExpansionCache, as plain tensors: the past (B, t, D) / (B, t * E, D) goes
    in, `append` concatenates the newest position and `present` holds the result.

    This is the functional form of a decoding step (no in-place writes), which an exported graph needs: its past
    tensors are graph inputs and its present tensors graph outputs.
    """

    NAMES = DynamicExpansionCache.NAMES

    def __init__(self, past: dict[str, torch.Tensor]) -> None:
        self.past = past
        self.present: dict[str, torch.Tensor] = {}

    def append(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        full = torch.cat([self.past[name], rows], dim=1)
        self.present[name] = full
        return full

    def hide_unwritten(self, scores: torch.Tensor, rows_per_position: int) -> torch.Tensor:
        return scores


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

    def __init__(self, cross: list[CrossAttentionCache], dyn: list[DynamicExpansionCache] | list[FixedExpansionCache],
                 group: int, max_len: int) -> None:
        self.cross = cross
        self.dyn = dyn
        self.group = group
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.dyn[0].length

    def advance(self) -> None:
        for c in self.dyn:
            c.advance()

    def reorder(self, index: torch.Tensor) -> None:
        """index (B*group,) of source rows, each within its own image's group."""
        for c in self.dyn:
            c.reorder(index)
