"""Decoder state for incremental decoding: per-layer dynamic-expansion caches and cross-attention keys/values.

Every expansion cache answers the same calls, which is all DynamicExpansionBlock.step asks of it: `append` the
newest position's rows, `scores` (queries against the hypothesis's past rows), `read` (weights over them) and
`hide_unwritten`, and says whether it `keeps_forward_weights` (see DynamicExpansionCache; such a cache also answers
the eval-mode step's `expansion_scores` and `read_pairs`). What a "past" is differs: a beam search's hypotheses
share their images' stored rows through an ancestry table (DynamicExpansionCache), a compiled step reads fixed-size
per-hypothesis buffers (FixedExpansionCache) and an exported graph concatenated tensors (ConcatExpansionCache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NAMES = ("k", "va", "vb", "cond", "ca", "cb")
"""Per past position: key K, values Va, Vb and the conditioning vector cond (one row of D each), and the forward-step
outputs Ca, Cb of its E expanded rows (E x D each), which never change once written (the forward step is causal).
Expanded queries and biases are not stored: they are q_exp[e] + cond_t and b_exp[e] + cond_t."""


class _HypothesisRows:
    """`scores` and `read` for caches that hold each hypothesis's past rows as its own (hypotheses, rows, D) tensor:
    plain batched matrix products against `history(name)`."""

    keeps_forward_weights = False  # they hold Ca, Cb themselves (fixed shapes for compiled and exported steps)

    def history(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """q (R, M, D) against the past rows of `name` -> (R, M, rows)."""
        return torch.matmul(q, self.history(name).transpose(1, 2))

    def read(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Weights w (R, M, rows) over the past rows of `name` -> (R, M, D)."""
        return torch.matmul(w, self.history(name))


class Ancestry:
    """Where a beam's hypotheses find their past: for each hypothesis (images x group rows) and past position, the
    slot (0..group-1) its ancestor held in the image's group at that position.

    A beam re-ordering gathers this (rows, positions) table of integers instead of the caches' rows: the rows each
    step wrote stay where they were written, shared by every descendant. Shared by the layers of one decoder.
    """

    def __init__(self, images: int, group: int, max_len: int, device: torch.device) -> None:
        self.images, self.group, self.max_len = images, group, max_len
        own = torch.arange(group, device=device).repeat(images)  # row b*group+i writes slot i at every position
        self.table = own[:, None].repeat(1, max_len)  # positions not reached yet hold the own slot
        self.length = 0
        self._derived: dict[str, torch.Tensor] = {}  # from length and table, shared by the layers; cleared on change

    def advance(self) -> None:
        self.length += 1
        self._changed()

    def reorder(self, index: torch.Tensor) -> None:
        """Hypothesis r continues hypothesis index[r]: it inherits that one's ancestors at the filled positions."""
        if self.length:
            self.table[:, :self.length] = self.table[index, :self.length]
            self._changed()

    def _changed(self) -> None:
        self._derived.clear()

    def onehot(self, dtype: torch.dtype) -> torch.Tensor:
        """(images, group, T, group) of 0/1: row (b, i) reads slot a at position t (T: the filled positions + 1)."""
        key = f"onehot-{dtype}"
        if key not in self._derived:
            slots = torch.arange(self.group, device=self.table.device)
            table = self.table[:, :self.length + 1]
            self._derived[key] = (table[..., None] == slots).to(dtype).view(self.images, self.group, -1, self.group)
        return self._derived[key]

    def slots(self, queries: int, rows_per_position: int) -> torch.Tensor:
        """(images, group, queries, T, 1, rows_per_position): the table as a gather index of every slot's scores."""
        key = f"slots-{queries}-{rows_per_position}"
        if key not in self._derived:
            T = self.length + 1
            self._derived[key] = self.table[:, :T].view(self.images, self.group, 1, T, 1, 1).expand(
                -1, -1, queries, -1, -1, rows_per_position)
        return self._derived[key]

    def source_rows(self) -> torch.Tensor:
        """(images * group * T,): for hypothesis r and position t, its ancestor's row in a (images * max_len * group)
        store of one row per position, flattened; T: the filled positions + 1."""
        if "rows" not in self._derived:
            T, g = self.length + 1, self.group
            image = torch.arange(self.images, device=self.table.device).repeat_interleave(g)[:, None]
            position = torch.arange(T, device=self.table.device)
            self._derived["rows"] = ((image * self.max_len + position) * g + self.table[:, :T]).reshape(-1)
        return self._derived["rows"]


class DynamicExpansionCache(_HypothesisRows):
    """Per-layer state of the dynamic expansion for a beam (or any group) of hypotheses per image, position-major:
    store[name] (images, max_len * group * n, width), position t's rows of the group's slot i at t*group*n + i*n.

    Nothing is moved on a beam re-ordering (the Ancestry says which slot a hypothesis's past is in). Rows that E
    queries per hypothesis read (the training step's reads of k, va, vb) are gathered into per-hypothesis rows:
    gathering the T rows each needs is cheaper than multiplying every slot's. Reads of one or two queries per
    hypothesis (memory-bound) are made in place: one product per image against every slot's rows, the other slots'
    rows weighted 0 - the same bytes a per-hypothesis product reads, where gathering them at every step cost a
    quarter of a beam search (docs/benchmarks.md, "Decoding"); scores likewise, then each hypothesis's own slots
    picked. With group 1 it is a plain per-hypothesis cache. A first step run once per image (one row per image,
    before any re-ordering) fills every slot of position 0 and reads like a group of one.

    Besides NAMES it keeps, for the eval-mode step (keeps_forward_weights), both classes side by side: "v" holds
    Va | Vb (one row of 2D per position) and "f" the forward step's weights Fa, Fb (E rows per position, their
    columns position-major and class-minor: column 2s + c weighs class c's value of position s; zeros after the row's
    own position), from which Ca, Cb are one product away at 1/25 of their bytes (D = 512, 20 positions). The step
    reads both classes in one product each (`read_pairs`). Stores are made at their first append.
    """

    NAMES = NAMES
    keeps_forward_weights = True

    def __init__(self, ancestry: Ancestry, max_len: int, num_exp: int, d_model: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self._per_position = {name: num_exp if name in ("ca", "cb", "f") else 1 for name in (*NAMES, "v", "f")}
        self._columns = {name: d_model for name in NAMES} | {"v": 2 * d_model, "f": 2 * max_len}
        self._store: dict[str, torch.Tensor] = {}
        self.ancestry = ancestry
        self.max_len, self.d_model, self.device, self.dtype = max_len, d_model, device, dtype

    @property
    def length(self) -> int:
        return self.ancestry.length

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored rows by name (what the cache holds, for its dtype and device)."""
        return self._store

    def _make_store(self, name: str) -> torch.Tensor:
        shape = (self.ancestry.images, self.max_len * self.ancestry.group * self._per_position[name],
                 self._columns[name])
        if name == "f":  # zeros: a row's columns after its own position are read as weights 0
            return torch.zeros(shape, device=self.device, dtype=self.dtype)
        return torch.empty(shape, device=self.device, dtype=self.dtype)  # only written rows are ever read

    def append(self, name: str, rows: torch.Tensor) -> None:
        """Write the newest position's rows (images*group, n, columns): n is 1, or num_exp for ca, cb, f; the
        forward weights f come as (images*group, num_exp, positions so far, 2)."""
        if name not in self._store:
            self._store[name] = self._make_store(name)
        B, g, n = self.ancestry.images, self.ancestry.group, rows.shape[1]
        start = self.ancestry.length * g * n
        store = self._store[name]
        if name == "f":
            store = store.view(B, store.shape[1], self.max_len, 2)
        slots = store[:, start:start + g * n, :rows.shape[2]].unflatten(1, (g, n))
        slots.copy_(rows.reshape(B, -1, n, *rows.shape[2:]))  # a first step run once per image fills every slot

    def _filled(self, name: str) -> torch.Tensor:
        T = self.ancestry.length + 1
        filled = self._store[name][:, :T * self.ancestry.group * self._per_position[name]]
        return filled[..., :2 * T] if name == "f" else filled

    def _own_rows(self, name: str, rows: int) -> torch.Tensor | None:
        """Each hypothesis's past rows of `name` as one plain (rows, T * n, columns) tensor where they need no
        ancestry: a group of one, or a first step run once per image (`rows` == images; the group's hypotheses are
        still one, and slot 0 holds their rows). None otherwise."""
        if self.ancestry.group == 1:
            return self._filled(name)
        if rows != self.ancestry.images:
            return None
        if self.ancestry.length:
            raise ValueError("only the first step can run once per image (one row per image)")
        first = self._store[name][:, :self._per_position[name]]
        return first[..., :2] if name == "f" else first

    def history(self, name: str) -> torch.Tensor:
        """(R, T * n, width): each hypothesis's own past rows of `name`, the newest position included."""
        if self.ancestry.group == 1:
            return self._filled(name)
        if self._per_position[name] != 1:
            raise ValueError(f"{name} is read in place (DynamicExpansionCache.read), not gathered")
        store = self._store[name]
        rows = store.view(-1, store.shape[-1]).index_select(0, self.ancestry.source_rows())
        return rows.view(self.ancestry.images * self.ancestry.group, -1, store.shape[-1])

    def read(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Weights w (R, M, T * n) over the hypothesis's own past rows of `name` -> (R, M, width)."""
        B, g, n = self.ancestry.images, self.ancestry.group, self._per_position[name]
        R, M, _ = w.shape
        plain = self._own_rows(name, R)
        if plain is not None:
            return torch.matmul(w, plain)
        if n == 1 and M > 2:  # many queries (E) per hypothesis: gathering their rows is cheaper
            return super().read(name, w)
        onehot = self.ancestry.onehot(w.dtype)  # (B, g, T, g)
        T = onehot.shape[2]
        spread = w.reshape(B, g, M, T, 1, n) * onehot.view(B, g, 1, T, g, 1)  # zero weight on other slots' rows
        return torch.matmul(spread.view(B, g * M, T * g * n), self._filled(name)).view(R, M, -1)

    def read_pairs(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Weights w (R, 2, T * n) of the two classes over the past rows of "v" or "f", which hold both classes'
        columns, each class reading its own -> (R, 2, columns / 2): one product for both (a strided view)."""
        both = self.read(name, w)  # (R, 2 queries, columns of both classes)
        R = both.shape[0]
        if name == "f":  # class-minor columns
            return both.view(R, 2, -1, 2).diagonal(dim1=1, dim2=3).transpose(1, 2)
        return both.view(R, 2, 2, -1).diagonal(dim1=1, dim2=2).transpose(1, 2)  # halves: Va | Vb

    def scores(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """q (R, M, D) against the hypothesis's own past rows of `name` -> (R, M, T * n)."""
        B, g = self.ancestry.images, self.ancestry.group
        R, M, D = q.shape
        plain = self._own_rows(name, R)
        if plain is not None:
            return torch.matmul(q, plain.transpose(1, 2))
        if M > 1:
            return super().scores(name, q)
        every_slot = torch.matmul(q.reshape(B, g, D), self._filled(name).transpose(1, 2))  # (B, g, T*g*n)
        return self._own_slots(every_slot.view(B, g, 1, -1), name)

    def expansion_scores(self, name: str, shared: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Scores shared[m] . row + own_r . row (shared (M, D) queries for every hypothesis r, own (R, 1, D) its
        own) against each hypothesis's past rows of `name` -> (R, M, T * n): one product per image for all of
        them, whatever the group."""
        B, g = self.ancestry.images, self.ancestry.group
        M, D = shared.shape
        plain = self._own_rows(name, own.shape[0])
        if plain is not None:
            return torch.matmul(shared, plain.transpose(1, 2)) + torch.matmul(own, plain.transpose(1, 2))
        rows = self._filled(name).transpose(1, 2)
        queries = torch.cat((shared.expand(B, M, D), own.reshape(B, g, D)), dim=1)
        every_slot = torch.matmul(queries, rows)  # (B, M + g, T*g*n)
        return self._own_slots(every_slot[:, None, :M] + every_slot[:, M:, None], name)

    def _own_slots(self, every_slot: torch.Tensor, name: str) -> torch.Tensor:
        """(B, g, M, T*g*n) scores against every slot's rows -> (R, M, T*n) against each hypothesis's own."""
        B, g, M, _ = every_slot.shape
        n = self._per_position[name]
        s = every_slot.view(B, g, M, -1, g, n)
        return s.gather(4, self.ancestry.slots(M, n)).view(B * g, M, -1)

    def hide_unwritten(self, scores: torch.Tensor, rows_per_position: int) -> torch.Tensor:
        """Scores against the rows `scores`/`read` see, unchanged: every one of them is written."""
        return scores


class FixedExpansionCache(_HypothesisRows):
    """The same state per hypothesis in buffers whose shapes never change, for a compiled decoding step
    (torch.compile): (hypotheses, max_len * n, D), each with a spare twin so that a beam re-ordering is one gather
    into the spare and a swap.

    `append` writes the newest position at `position` (a tensor, not a Python int) and the reads see the whole
    max_len buffer; `hide_unwritten` zeroes the scores of the positions not written yet. A compiled step therefore
    sees the same shapes and the same Python values at every position and compiles once, where a growing prefix
    would give it a new shape (and a recompilation) at every step. The rows beyond the written positions are zeros
    (both twins start zeroed, and a re-ordering copies the written prefix only), so masked scores meet finite values.
    Eager decoding keeps DynamicExpansionCache: reading the unwritten positions too costs up to twice the expansion
    arithmetic.
    """

    NAMES = NAMES

    def __init__(self, batch: int, max_len: int, num_exp: int, d_model: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self._per_position = {name: num_exp if name in ("ca", "cb") else 1 for name in NAMES}
        self._buffers = {name: torch.zeros(batch, max_len * n, d_model, device=device, dtype=dtype)
                         for name, n in self._per_position.items()}
        self._spares = {name: torch.zeros_like(buf) for name, buf in self._buffers.items()}
        self.length = 0
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # (1,): dynamo would make a 0-d one an int

    def append(self, name: str, rows: torch.Tensor) -> None:
        """Write rows (B, n, D) at `position`."""
        n = rows.shape[1]
        buf = self._buffers[name]
        index = self.position * n + torch.arange(n, device=buf.device)
        buf.index_copy_(1, index, rows.to(buf.dtype))

    def history(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers by name (what the cache holds, for its dtype and device)."""
        return self._buffers

    def hide_unwritten(self, scores: torch.Tensor, rows_per_position: int) -> torch.Tensor:
        """Scores (..., max_len * rows_per_position) with the rows of positions after `position` set to zero."""
        rows = torch.arange(scores.shape[-1], device=scores.device)
        return scores.masked_fill(rows >= (self.position + 1) * rows_per_position, 0.0)

    def advance(self) -> None:
        self.length += 1
        self.position.fill_(self.length)

    def reorder(self, index: torch.Tensor) -> None:
        """Gather rows along the hypothesis axis (beam re-ordering): the written prefix, into the spare buffers."""
        for name, n in self._per_position.items():
            filled = self.length * n
            src, dst = self._buffers[name], self._spares[name]
            torch.index_select(src[:, :filled], 0, index, out=dst[:, :filled])
            self._buffers[name], self._spares[name] = dst, src


class ConcatExpansionCache(_HypothesisRows):
    """The same per-layer state as plain tensors: the past (B, t, D) / (B, t * E, D) goes in, `append` concatenates
    the newest position and `present` holds the result.

    This is the functional form of a decoding step (no in-place writes), which an exported graph needs: its past
    tensors are graph inputs and its present tensors graph outputs.
    """

    NAMES = NAMES

    def __init__(self, past: dict[str, torch.Tensor]) -> None:
        self.past = past
        self.present: dict[str, torch.Tensor] = {}

    def append(self, name: str, rows: torch.Tensor) -> None:
        self.present[name] = torch.cat([self.past[name], rows], dim=1)

    def history(self, name: str) -> torch.Tensor:
        return self.present[name]

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
    moves a hypothesis to another image). A re-ordering moves the Ancestry of the growing caches (a table of
    integers), or gathers the fixed-size caches' rows.
    """

    def __init__(self, cross: list[CrossAttentionCache], dyn: list[DynamicExpansionCache] | list[FixedExpansionCache],
                 group: int, max_len: int, ancestry: Ancestry | None = None, reorders: bool = True) -> None:
        self.cross = cross
        self.dyn = dyn
        self.group = group
        self.max_len = max_len
        self.reorders = reorders
        self._positions: list[Ancestry] | list[FixedExpansionCache] = [ancestry] if ancestry is not None else dyn

    @property
    def length(self) -> int:
        return self._positions[0].length

    def advance(self) -> None:
        for p in self._positions:
            p.advance()

    def reorder(self, index: torch.Tensor) -> None:
        """index (B*group,) of source rows, each within its own image's group."""
        if not self.reorders:
            raise RuntimeError("this decoder cache was made for a search that never re-orders (reorders=False)")
        for p in self._positions:
            p.reorder(index)
