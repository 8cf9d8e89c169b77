"""The dynamic expansion (the decoder's causal block) and its cached decoding steps, one per cache layout.

`DynamicExpansionBlock.forward` defines the block over a whole sequence. Every part of it is causal, so a decoding
step computes only the newest position from what a cache keeps of the earlier ones (why that is the same function,
up to the rounding of other summation orders: docs/architecture.md, "Cached decoding"). Each cache type owns its
layout and the step that writes and reads it; ExpansionNet.init_cache chooses the type once, where the cache is made:

- a RowsCache keeps each hypothesis's own rows of `cached_rows` (Ca and Cb included, so the training-mode dropouts
  act where the forward pass's do): PrefixExpansionCache (eager, training mode: SCST sampling),
  FixedExpansionCache (a compiled step: shapes that never change) and ConcatExpansionCache (an exported step: past
  tensors in, present tensors out) run the same `RowsCache.step`;
- ForwardWeightsCache (eager decoding in eval mode) keeps the forward step's weights instead of Ca and Cb, both
  classes side by side, and a beam's rows shared through an Ancestry: its own step, several times faster on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import ExpansionBlock, normalise


class DynamicExpansionBlock(ExpansionBlock):
    """Dynamic expansion over a causal token sequence; `step` processes one new position on a cache."""

    key_linear: nn.Linear

    def __init__(self, d_model: int, num_exp: int, dropout: float, gated: bool = False) -> None:
        super().__init__()
        self.num_exp = num_exp
        self.cond_embed = nn.Linear(d_model, d_model)
        self._add_expansion(d_model, num_exp, "key_linear", dropout, gated)
        # the step_projections as one product, where models.cpu_packing installed it (not a module: no parameters)
        self.joint_projections: Callable[[torch.Tensor], list[torch.Tensor]] | None = None

    def step_projections(self) -> tuple[nn.Linear, ...]:
        """The linear layers a step applies to its input, in the order ForwardWeightsCache.step reads them: cond, key,
        the two classes' values (before their gates), selector."""
        return self.cond_embed, self.key_linear, self.class_a_embed, self.class_b_embed, self.selector_embed

    def _expand(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expanded queries and biases (B, T, E, D) of every position."""
        c = self.cond_embed(x).unsqueeze(2)
        return self.query_exp_vectors.weight + c, self.bias_exp_vectors.weight + c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) layer-normed; causal. Returns (B, T, D). Right padding never reaches earlier positions."""
        B, T, D = x.shape
        E = self.num_exp
        qe, be = self._expand(x)
        qe, be = qe.reshape(B, T * E, D), be.reshape(B, T * E, D)  # row t*E+e
        k = self.key_linear(x)
        z = self.Z_dropout(torch.matmul(qe, k.transpose(1, 2)) / math.sqrt(D))  # (B, TE, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (t, s): s <= t
        fw_mask = causal.repeat_interleave(E, dim=0).to(z.dtype)  # (TE, T)
        va, vb = self.values(x)
        ca = self.dropout_class_a_fw(torch.matmul(normalise(F.relu(z) * fw_mask), va))
        cb = self.dropout_class_b_fw(torch.matmul(normalise(F.relu(-z) * fw_mask), vb))
        zt = z.transpose(1, 2)  # (B, T, TE)
        bw_mask = causal.repeat_interleave(E, dim=1).to(z.dtype)  # (T, TE): row t reads expanded rows of s <= t
        oa = self.dropout_class_a_bw(torch.matmul(normalise(F.relu(zt) * bw_mask), ca + be))
        ob = self.dropout_class_b_bw(torch.matmul(normalise(F.relu(-zt) * bw_mask), cb + be))
        return self.select(x, oa, ob)

    def step(self, x: torch.Tensor, cache: RowsCache | ForwardWeightsCache) -> torch.Tensor:
        """One new position x (R, 1, D) after the cached ones, appended to the cache; returns (R, 1, D). The cache's
        own step computes it on the cache's layout."""
        return cache.step(self, x)


# ------------------------------------------------------------------------ each hypothesis's own rows, any mode
def cached_rows(num_exp: int) -> dict[str, int]:
    """What a RowsCache keeps of each past position, by name, and how many rows of d_model: key K, values Va, Vb and
    the conditioning cond (one row each), and the forward step's outputs Ca, Cb of its E expanded rows (E rows each),
    which never change once written. Expanded queries and biases are not kept: they are q_exp[e] + cond_t and
    b_exp[e] + cond_t. The exported step's past and present tensors are these (deploy.onnx_export)."""
    return {"k": 1, "va": 1, "vb": 1, "cond": 1, "ca": num_exp, "cb": num_exp}


class RowsCache:
    """Each hypothesis's past rows of `cached_rows` as (hypotheses, rows, d_model) tensors (`history`), and the step
    on them: every mode (dropouts where the block trains), eager, compiled or exported."""

    def append(self, name: str, rows: torch.Tensor) -> None:
        """Write the newest position's rows (R, n, D) of `name`."""
        raise NotImplementedError

    def history(self, name: str) -> torch.Tensor:
        """(R, rows, D): each hypothesis's past rows of `name`, the newest position's included."""
        raise NotImplementedError

    def hide_unwritten(self, scores: torch.Tensor, rows_per_position: int) -> torch.Tensor:
        """Scores against `history` with those of rows not written yet set to zero (none here: history ends at the
        newest position)."""
        return scores

    def _scores(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """q (R, M, D) against the past rows of `name` -> (R, M, rows)."""
        return torch.matmul(q, self.history(name).transpose(1, 2))

    def _read(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Weights w (R, M, rows) over the past rows of `name` -> (R, M, D)."""
        return torch.matmul(w, self.history(name))

    def step(self, block: DynamicExpansionBlock, x: torch.Tensor) -> torch.Tensor:
        """Position j = x (R, 1, D). The backward step's scores of the expanded rows (t, e) against the new key are
        K_j . cond_t + K_j . q_exp[e], and the biases b_exp[e] + cond_t enter the output through the weights'
        marginals, so neither expanded queries nor biases are kept."""
        E = block.num_exp
        scale = math.sqrt(x.shape[-1])
        q_exp = block.query_exp_vectors.weight
        cond = block.cond_embed(x)  # (R, 1, D)
        k_j = block.key_linear(x)
        va, vb = block.values(x)
        for name, rows in (("k", k_j), ("cond", cond), ("va", va), ("vb", vb)):
            self.append(name, rows)
        # forward step of position j: its expanded queries q_exp[e] + cond_j against keys 0..j, (R, E, T)
        z = block.Z_dropout(self.hide_unwritten(self._scores("k", q_exp + cond) / scale, 1))
        for c, w, drop_fw in (("a", F.relu(z), block.dropout_class_a_fw), ("b", F.relu(-z), block.dropout_class_b_fw)):
            self.append("c" + c, drop_fw(self._read("v" + c, normalise(w))))  # (R, E, D)
        z_t = self._scores("cond", k_j)  # (R, 1, T)
        z_e = torch.matmul(k_j, q_exp.t())  # (R, 1, E)
        zb = block.Z_dropout(self.hide_unwritten(((z_t[..., :, None] + z_e[..., None, :]) / scale).flatten(-2), E))
        outs = []
        for w, c, drop in ((normalise(F.relu(zb)), "a", block.dropout_class_a_bw),
                           (normalise(F.relu(-zb)), "b", block.dropout_class_b_bw)):
            w4 = w.unflatten(-1, (-1, E))  # (R, 1, T, E)
            bias = torch.matmul(w4.sum(2), block.bias_exp_vectors.weight) + self._read("cond", w4.sum(3))
            outs.append(drop(self._read("c" + c, w) + bias))
        return block.select(x, *outs)


class PrefixExpansionCache(RowsCache):
    """Buffers of max_len positions per hypothesis, read up to the newest position: eager decoding in training mode
    (SCST sampling, whose dropouts act on Ca and Cb), which never re-orders its hypotheses."""

    def __init__(self, hypotheses: int, max_len: int, num_exp: int, d_model: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self._rows = cached_rows(num_exp)
        self._buffers = {name: torch.empty(hypotheses, max_len * n, d_model, device=device, dtype=dtype)
                         for name, n in self._rows.items()}  # only written rows are ever read
        self.length = 0

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers by name (what the cache holds, for its dtype and device)."""
        return self._buffers

    def append(self, name: str, rows: torch.Tensor) -> None:
        n = self._rows[name]
        self._buffers[name][:, self.length * n:(self.length + 1) * n] = rows

    def history(self, name: str) -> torch.Tensor:
        return self._buffers[name][:, :(self.length + 1) * self._rows[name]]

    def advance(self) -> None:
        self.length += 1


class FixedExpansionCache(RowsCache):
    """Per-hypothesis buffers whose shapes never change, for a compiled decoding step (torch.compile):
    (hypotheses, max_len * n, D), each with a spare twin so that a beam re-ordering is one gather into the spare and
    a swap.

    `append` writes the newest position at `position` (a tensor, not a Python int) and the reads see the whole
    max_len buffer; `hide_unwritten` zeroes the scores of the positions not written yet. A compiled step therefore
    sees the same shapes and the same Python values at every position and compiles once, where a growing prefix
    would give it a new shape (and a recompilation) at every step. The rows beyond the written positions are zeros
    (both twins start zeroed, and a re-ordering copies the written prefix only), so masked scores meet finite values.
    Eager decoding keeps growing caches: reading the unwritten positions too costs up to twice the arithmetic.
    """

    def __init__(self, hypotheses: int, max_len: int, num_exp: int, d_model: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self._rows = cached_rows(num_exp)
        self._buffers = {name: torch.zeros(hypotheses, max_len * n, d_model, device=device, dtype=dtype)
                         for name, n in self._rows.items()}
        self._spares = {name: torch.zeros_like(buf) for name, buf in self._buffers.items()}
        self.length = 0
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # (1,): dynamo would make a 0-d one an int

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers by name (what the cache holds, for its dtype and device)."""
        return self._buffers

    def append(self, name: str, rows: torch.Tensor) -> None:
        """Write rows (R, n, D) at `position`."""
        n = rows.shape[1]
        buf = self._buffers[name]
        index = self.position * n + torch.arange(n, device=buf.device)
        buf.index_copy_(1, index, rows.to(buf.dtype))

    def history(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def hide_unwritten(self, scores: torch.Tensor, rows_per_position: int) -> torch.Tensor:
        """Scores (..., max_len * rows_per_position) with the rows of positions after `position` set to zero."""
        rows = torch.arange(scores.shape[-1], device=scores.device)
        return scores.masked_fill(rows >= (self.position + 1) * rows_per_position, 0.0)

    def advance(self) -> None:
        self.length += 1
        self.position.fill_(self.length)

    def reorder(self, index: torch.Tensor) -> None:
        """Gather rows along the hypothesis axis (beam re-ordering): the written prefix, into the spare buffers."""
        for name, n in self._rows.items():
            filled = self.length * n
            src, dst = self._buffers[name], self._spares[name]
            torch.index_select(src[:, :filled], 0, index, out=dst[:, :filled])
            self._buffers[name], self._spares[name] = dst, src


class ConcatExpansionCache(RowsCache):
    """The rows as plain tensors: the past (R, t * n, D) goes in, `append` concatenates the newest position and
    `present` holds the result.

    This is the functional form of a decoding step (no in-place writes), which an exported graph needs: its past
    tensors are graph inputs and its present tensors graph outputs.
    """

    def __init__(self, past: dict[str, torch.Tensor]) -> None:
        self.past = past
        self.present: dict[str, torch.Tensor] = {}

    def append(self, name: str, rows: torch.Tensor) -> None:
        self.present[name] = torch.cat([self.past[name], rows], dim=1)

    def history(self, name: str) -> torch.Tensor:
        return self.present[name]


# -------------------------------------------------------------- eval mode: forward weights, rows shared by a beam
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
        self.first_step_once = False  # the coming step runs once per image (share_first_step)
        self._derived: dict[str, torch.Tensor] = {}  # from length and table, shared by the layers; cleared on change

    def share_first_step(self) -> None:
        """The coming first step runs once per image (one row per image: the group's hypotheses are one until the
        first re-ordering): its rows fill every slot of position 0, and its reads take slot 0's."""
        if self.length:
            raise ValueError(f"only the first step can run once per image; {self.length} have run")
        self.first_step_once = True

    def advance(self) -> None:
        self.length += 1
        self.first_step_once = False
        self._derived.clear()

    def reorder(self, index: torch.Tensor) -> None:
        """Hypothesis r continues hypothesis index[r]: it inherits that one's ancestors at the filled positions."""
        if self.length:
            self.table[:, :self.length] = self.table[index, :self.length]
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


class ForwardWeightsCache:
    """Per-layer state of eager decoding in eval mode, for a beam (or any group) of hypotheses per image, and its step.

    Layout, written and read here only: store[name] (images, max_len * group * n, columns), position t's rows of the
    group's slot i at t*group*n + i*n (position-major), made at the first append.
    - "k", "cond": K_t and cond_t (n = 1, d_model columns);
    - "v": Va_t | Vb_t side by side (n = 1, 2 d_model columns), so that one product reads both classes;
    - "f": the forward step's weights Fa, Fb of position t's E expanded rows (n = E, 2 max_len columns, position-major
      and class-minor: column 2s + c weighs class c's value of position s; zeros after the row's own position).
      Ca = Fa Va, so the backward step reads the values through them, w Ca = (w Fa) Va: 1/25 of Ca's bytes
      (d_model 512, 20 positions). Dropouts cannot act on Ca here, hence eval mode only.

    Nothing moves on a beam re-ordering (the Ancestry says which slot a hypothesis's past is in). A read (one or two
    queries per hypothesis: memory-bound) is one product per image against every slot's rows, the other slots'
    rows weighted 0: the same bytes a per-hypothesis product reads, where gathering them at every step cost a
    quarter of a beam search (docs/benchmarks.md, "Decoding"); scores likewise, then each hypothesis's own slots
    picked. With a group of one (sampling, greedy search) it is a plain per-hypothesis cache; a first step run once
    per image (Ancestry.share_first_step) reads like one.
    """

    def __init__(self, ancestry: Ancestry, max_len: int, num_exp: int, d_model: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self._per_position = {"k": 1, "cond": 1, "v": 1, "f": num_exp}
        self._columns = {"k": d_model, "cond": d_model, "v": 2 * d_model, "f": 2 * max_len}
        self._store: dict[str, torch.Tensor] = {}
        self.ancestry = ancestry
        self.max_len, self.device, self.dtype = max_len, device, dtype

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored rows by name (what the cache holds, for its dtype and device)."""
        return self._store

    def step(self, block: DynamicExpansionBlock, x: torch.Tensor) -> torch.Tensor:
        """RowsCache.step in eval mode (dropouts are identities) on this layout: the shared expansion queries score
        each image's keys once, the two classes go through each operation together (a leading axis of 2), and the
        five input projections are one product where models.cpu_packing joined them."""
        if block.training:
            raise RuntimeError("a ForwardWeightsCache serves eval mode only (its dropouts cannot act on Ca); "
                               "make the cache after model.eval(), or in training mode for a training step")
        E = block.num_exp
        scale = math.sqrt(x.shape[-1])
        q_exp = block.query_exp_vectors.weight
        joint = block.joint_projections
        cond, k_j, va, vb, s = joint(x) if joint is not None else [linear(x) for linear in block.step_projections()]
        va, vb = block.gate(va, vb)
        self._append("k", k_j)
        self._append("cond", cond)
        self._append("v", torch.cat((va, vb), dim=-1))
        z = self._expansion_scores("k", q_exp, cond) / scale  # (R, E, T): q_exp[e] + cond against the keys
        self._append("f", normalise(F.relu(torch.stack((z, -z), dim=2))).transpose(2, 3))  # (R, E, T, 2)
        z_t = self._scores("cond", k_j)  # (R, 1, T)
        z_e = torch.matmul(k_j, q_exp.t())  # (R, 1, E)
        zb = ((z_t[..., :, None] + z_e[..., None, :]) / scale).flatten(-2)  # (R, 1, T * E)
        w = normalise(F.relu(torch.cat((zb, -zb), dim=1)))  # (R, 2, T * E): classes a, b
        w4 = w.unflatten(-1, (-1, E))  # (R, 2, T, E)
        bias = torch.matmul(w4.sum(2), block.bias_exp_vectors.weight) + self._read("cond", w4.sum(3))
        out = self._read_pairs("v", self._read_pairs("f", w)) + bias  # (R, 2, D)
        return block.select(x, out[:, :1], out[:, 1:], selector=s)

    def _make_store(self, name: str) -> torch.Tensor:
        shape = (self.ancestry.images, self.max_len * self.ancestry.group * self._per_position[name],
                 self._columns[name])
        if name == "f":  # zeros: a row's columns after its own position are read as weights 0
            return torch.zeros(shape, device=self.device, dtype=self.dtype)
        return torch.empty(shape, device=self.device, dtype=self.dtype)  # only written rows are ever read

    def _append(self, name: str, rows: torch.Tensor) -> None:
        """Write the newest position's rows (R, n, columns): n is 1, or num_exp for f, which comes as
        (R, num_exp, positions so far, 2)."""
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

    def _own_rows(self, name: str) -> torch.Tensor | None:
        """Each hypothesis's past rows of `name` as one plain (R, T * n, columns) tensor where they need no ancestry:
        a group of one, or a first step run once per image (one row per image; slot 0 holds its rows). None
        otherwise."""
        if self.ancestry.group == 1:
            return self._filled(name)
        if not self.ancestry.first_step_once:
            return None
        first = self._store[name][:, :self._per_position[name]]
        return first[..., :2] if name == "f" else first

    def _read(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Weights w (R, M, T * n) over the hypothesis's own past rows of `name` -> (R, M, columns)."""
        plain = self._own_rows(name)
        if plain is not None:
            return torch.matmul(w, plain)
        B, g, n = self.ancestry.images, self.ancestry.group, self._per_position[name]
        R, M, _ = w.shape
        onehot = self.ancestry.onehot(w.dtype)  # (B, g, T, g)
        T = onehot.shape[2]
        spread = w.reshape(B, g, M, T, 1, n) * onehot.view(B, g, 1, T, g, 1)  # zero weight on other slots' rows
        return torch.matmul(spread.view(B, g * M, T * g * n), self._filled(name)).view(R, M, -1)

    def _read_pairs(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Weights w (R, 2, T * n) of the two classes over the past rows of "v" or "f", which hold both classes'
        columns, each class reading its own -> (R, 2, columns / 2): one product for both (a strided view)."""
        both = self._read(name, w)  # (R, 2 queries, columns of both classes)
        R = both.shape[0]
        if name == "f":  # class-minor columns
            return both.view(R, 2, -1, 2).diagonal(dim1=1, dim2=3).transpose(1, 2)
        return both.view(R, 2, 2, -1).diagonal(dim1=1, dim2=2).transpose(1, 2)  # halves: Va | Vb

    def _scores(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """One query q (R, 1, D) per hypothesis against its own past rows of `name` -> (R, 1, T * n)."""
        plain = self._own_rows(name)
        if plain is not None:
            return torch.matmul(q, plain.transpose(1, 2))
        B, g = self.ancestry.images, self.ancestry.group
        every_slot = torch.matmul(q.reshape(B, g, -1), self._filled(name).transpose(1, 2))  # (B, g, T*g*n)
        return self._own_slots(every_slot.view(B, g, 1, -1), name)

    def _expansion_scores(self, name: str, shared: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Scores shared[m] . row + own_r . row (shared (M, D) queries for every hypothesis r, own (R, 1, D) its
        own) against each hypothesis's past rows of `name` -> (R, M, T * n): one product per image for all of
        them, whatever the group."""
        plain = self._own_rows(name)
        if plain is not None:
            return torch.matmul(shared, plain.transpose(1, 2)) + torch.matmul(own, plain.transpose(1, 2))
        B, g = self.ancestry.images, self.ancestry.group
        M, D = shared.shape
        queries = torch.cat((shared.expand(B, M, D), own.reshape(B, g, D)), dim=1)
        every_slot = torch.matmul(queries, self._filled(name).transpose(1, 2))  # (B, M + g, T*g*n)
        return self._own_slots(every_slot[:, None, :M] + every_slot[:, M:, None], name)

    def _own_slots(self, every_slot: torch.Tensor, name: str) -> torch.Tensor:
        """(B, g, M, T*g*n) scores against every slot's rows -> (R, M, T*n) against each hypothesis's own."""
        B, g, M, _ = every_slot.shape
        n = self._per_position[name]
        s = every_slot.view(B, g, M, -1, g, n)
        return s.gather(4, self.ancestry.slots(M, n)).view(B * g, M, -1)
