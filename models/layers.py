"""ExpansionNet building blocks: static and dynamic expansion, (memory-augmented) attention, feed-forward, embedding.

Parameter names follow the official ExpansionNet v2 release so its checkpoint loads by name. The incremental
(`step`) paths are exact re-arrangements of the full computations (why: docs/architecture.md, "Cached decoding").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.cache import ConcatExpansionCache, DynamicExpansionCache, FixedExpansionCache

EXP_EPS = 1e-9  # normalisation epsilon of the expansion blocks (the reference's value)


def _eps(dtype: torch.dtype) -> float:
    """EXP_EPS, raised to the smallest normal number where the dtype cannot hold it (fp16: 1e-9 would round to 0
    and an all-zero row would divide 0 by 0); float32 and bfloat16 keep the reference's 1e-9 exactly."""
    return max(EXP_EPS, torch.finfo(dtype).tiny)


def _normalise(x: torch.Tensor, dim: int = -1, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.div(x, x.sum(dim=dim, keepdim=True) + _eps(x.dtype), out=out)


@functools.cache
def _mkl_packed_gemm_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _kept(packings: dict, key: tuple, pack: Callable[[], Any]) -> Any:
    """packings[key], made by pack() when missing; the oldest dropped beyond PackedLinear.KEPT_PACKINGS."""
    if key not in packings:
        if len(packings) >= PackedLinear.KEPT_PACKINGS:
            del packings[next(iter(packings))]
        packings[key] = pack()
    return packings[key]


class PackedLinear(nn.Linear):
    """nn.Linear whose products of few rows (a decoding step's images x hypotheses) run MKL's packed GEMM: the
    weight is packed once per row count (torch.ops.mkl, the packing torch.compile's CPU weight prepacking uses) and
    re-packed when the weight changes. 1.3-1.5x faster than F.linear at 40 rows (docs/benchmarks.md, "Decoding").

    Everything else takes F.linear: many rows, gradients, autocast, other dtypes or devices, tracing, export and
    compilation, and PyTorch builds without MKL. Same parameters and state dict as the nn.Linear it replaces.
    """

    MAX_ROWS = 256
    KEPT_PACKINGS = 4  # row counts a process alternates between (full and last batches, beam and greedy)

    @classmethod
    def replacing(cls, linear: nn.Linear) -> PackedLinear:
        """A PackedLinear holding `linear`'s own parameters (not copies)."""
        packed = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        packed.weight = linear.weight
        packed.bias = linear.bias
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not self._packable(x, rows):
            return F.linear(x, self.weight, self.bias)
        packed = _kept(self.__dict__.setdefault("_packings", {}), (rows, self.weight._version, self.weight.data_ptr()),
                       lambda: torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows))
        return torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, rows)

    def _packable(self, x: torch.Tensor, rows: int) -> bool:
        return (rows <= self.MAX_ROWS and not torch.is_grad_enabled() and x.dtype == self.weight.dtype == torch.float32
                and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export()
                and _mkl_packed_gemm_available())


def linear_outputs(x: torch.Tensor, linears: tuple[nn.Linear, ...], store: dict) -> list[torch.Tensor]:
    """Each linear layer applied to x. Where every one is a PackedLinear that would pack this product, they run as
    one packed product of their weights side by side (same values as one by one: MKL's sums per output do not
    depend on the other columns), kept in `store` per row count and rebuilt when a weight or bias changes."""
    rows = x.numel() // x.shape[-1]
    if not all(isinstance(linear, PackedLinear) and linear.bias is not None for linear in linears) or \
            not linears[0]._packable(x, rows):
        return [linear(x) for linear in linears]
    def pack() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = torch.cat([linear.weight.detach() for linear in linears]).t().contiguous().t()  # (in, out) order
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows), weight, torch.cat(
            [linear.bias.detach() for linear in linears])

    key = (rows, *((p._version, p.data_ptr()) for linear in linears for p in (linear.weight, linear.bias)))
    packed, weight, bias = _kept(store.setdefault("_joint_packings", {}), key, pack)
    return list(torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows).split(
        [linear.out_features for linear in linears], dim=-1))


class FeedForward(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear_2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without gradients the ReLU overwrites the hidden rows it reads (the encoder's are 9 MB): no new tensor
        return self.linear_2(self.dropout(F.relu(self.linear_1(x), inplace=not torch.is_grad_enabled())))


class EmbeddingLayer(nn.Module):
    """Token embedding with dropout applied before the sqrt(d_model) scale, as in the reference."""

    def __init__(self, vocab_size: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.scale = math.sqrt(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embed(tokens)) * self.scale


class MultiHeadAttention(nn.Module):
    """Multi-head attention with optional learned memory slots (Meshed-Memory Transformer style).

    With m memory slots, keys are concat(W_k x, sqrt(d_k) m_k) and values concat(W_v x, sqrt(m) m_v); padding masks
    apply to the real keys only, memory slots are always visible. Memory-augmented attention starts with zero biases
    and slots drawn by `reset_memory` (xavier: the sibling project's; m2: N(0, 1/d_k) and N(0, 1/m) as in M2).
    """

    def __init__(self, d_model: int, num_heads: int, memory_slots: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.d_k = d_model // num_heads
        self.memory_slots = memory_slots
        self.Wq = nn.Linear(d_model, d_model)
        self.Wk = nn.Linear(d_model, d_model)
        self.Wv = nn.Linear(d_model, d_model)
        self.out_linear = nn.Linear(d_model, d_model)
        if memory_slots > 0:
            self.m_k = nn.Parameter(torch.empty(1, memory_slots, d_model))
            self.m_v = nn.Parameter(torch.empty(1, memory_slots, d_model))
            self.reset_memory("xavier")

    def reset_memory(self, init: str) -> None:
        """Memory slots drawn as `init` says (xavier or m2) and the projections' biases set to zero."""
        if init == "xavier":
            nn.init.xavier_uniform_(self.m_k)
            nn.init.xavier_uniform_(self.m_v)
        elif init == "m2":
            nn.init.normal_(self.m_k, 0.0, 1.0 / self.d_k)
            nn.init.normal_(self.m_v, 0.0, 1.0 / self.memory_slots)
        else:
            raise ValueError(f"memory init must be xavier or m2, got {init!r}")
        for linear in (self.Wq, self.Wk, self.Wv, self.out_linear):
            nn.init.zeros_(linear.bias)

    def project_kv(self, kv: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor | None]:
        """Keys, values (B, h, N[+m], d_k) and additive mask (B, 1, 1, N[+m]) for inputs kv (B, N, D)."""
        B, N, _ = kv.shape
        k, v = self.Wk(kv), self.Wv(kv)
        if self.memory_slots > 0:  # the slots in the projections' dtype (under autocast, cat would promote to fp32)
            k = torch.cat([k, (math.sqrt(self.d_k) * self.m_k).to(k.dtype).expand(B, -1, -1)], dim=1)
            v = torch.cat([v, (math.sqrt(self.memory_slots) * self.m_v).to(v.dtype).expand(B, -1, -1)], dim=1)
            if key_mask is not None:
                key_mask = torch.cat([key_mask, key_mask.new_ones(B, self.memory_slots)], dim=1)
        k = k.view(B, -1, self.num_heads, self.d_k).transpose(1, 2)
        v = v.view(B, -1, self.num_heads, self.d_k).transpose(1, 2)
        bias = None
        if key_mask is not None:
            bias = torch.zeros(key_mask.shape, dtype=k.dtype, device=k.device).masked_fill(~key_mask, -1e4)
            bias = bias[:, None, None, :]
        return k, v, bias

    def attend(self, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
               causal: bool = False) -> torch.Tensor:
        """q_in (B, T, D) against projected keys/values (B, h, S, d_k); returns (B, T, D)."""
        B, T, D = q_in.shape
        q = self.Wq(q_in).view(B, T, self.num_heads, self.d_k).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
        return self.out_linear(out.transpose(1, 2).reshape(B, T, D))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, T, D), kv (B, N, D), key_mask (B, N) bool, True where the key is real."""
        k, v, bias = self.project_kv(kv, key_mask)
        return self.attend(q, k, v, bias)


class _ExpansionBlock(nn.Module):
    """What the static and dynamic expansions share: `rows` expansion queries and biases, a key projection, the two
    classes' values (optionally gated), the selector that mixes the classes, and the dropouts of the scores and of each
    class's forward and backward steps. Names (and registration order) are the official state dict's."""

    def _add_expansion(self, d_model: int, rows: int, key_name: str, dropout: float, gated: bool) -> None:
        """Registers the shared parts; the key projection under `key_name` (the two official blocks name it apart)."""
        self.d_model = d_model
        self.query_exp_vectors = nn.Embedding(rows, d_model)
        self.bias_exp_vectors = nn.Embedding(rows, d_model)
        setattr(self, key_name, nn.Linear(d_model, d_model))
        self.class_a_embed = nn.Linear(d_model, d_model)
        self.class_b_embed = nn.Linear(d_model, d_model)
        self.selector_embed = nn.Linear(d_model, d_model)
        if gated:
            self.class_a_gate = nn.Linear(d_model, d_model)
            self.class_b_gate = nn.Linear(d_model, d_model)
        self.gated = gated
        self.Z_dropout = nn.Dropout(dropout)
        self.dropout_class_a_fw = nn.Dropout(dropout)
        self.dropout_class_b_fw = nn.Dropout(dropout)
        self.dropout_class_a_bw = nn.Dropout(dropout)
        self.dropout_class_b_bw = nn.Dropout(dropout)

    def values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gate(self.class_a_embed(x), self.class_b_embed(x))

    def _gate(self, va: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The multiplicative residual embedding of the two classes' values, where the block has one."""
        if self.gated:
            va = va * torch.sigmoid(self.class_a_gate(va))
            vb = vb * torch.sigmoid(self.class_b_gate(vb))
        return va, vb

    def _select(self, x: torch.Tensor, oa: torch.Tensor, ob: torch.Tensor, selector: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The selector's per-feature mix of the two classes' outputs (selector: its projection of x, if made)."""
        s = torch.sigmoid(self.selector_embed(x) if selector is None else selector)
        return s * oa + (1 - s) * ob


class StaticExpansionBlock(_ExpansionBlock):
    """Block static expansion: the N input tokens are expanded into sum(num_exp_list) rows and read back per block."""

    key_embed: nn.Linear

    def __init__(self, d_model: int, num_exp_list: tuple[int, ...], dropout: float, gated: bool = False) -> None:
        super().__init__()
        self.num_exp_list = tuple(num_exp_list)
        self._add_expansion(d_model, sum(num_exp_list), "key_embed", dropout, gated)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) layer-normed tokens, key_mask (B, N) bool; returns (B, N, D)."""
        B, N, D = x.shape
        q = self.query_exp_vectors.weight  # (E, D)
        bias = self.bias_exp_vectors.weight  # (E, D)
        z = self.Z_dropout(torch.matmul(q, self.key_embed(x).transpose(1, 2)) / math.sqrt(D))  # (B, E, N)
        za, zb = F.relu(z), F.relu(-z)
        # backward step: per-block normalisation over the expansion axis, then the mean over the blocks
        wa = self._block_normalise(za.transpose(1, 2))  # (B, N, E)
        wb = self._block_normalise(zb.transpose(1, 2))
        if key_mask is not None:
            keep = key_mask[:, None, :].to(z.dtype)
            za, zb = za * keep, zb * keep
        va, vb = self.values(x)
        num_blocks = len(self.num_exp_list)
        oa = self.dropout_class_a_bw(self._read_back(wa, _normalise(za), va, bias, self.dropout_class_a_fw)
                                     / num_blocks)
        ob = self.dropout_class_b_bw(self._read_back(wb, _normalise(zb), vb, bias, self.dropout_class_b_fw)
                                     / num_blocks)
        return self._select(x, oa, ob)

    def _read_back(self, w: torch.Tensor, a: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                   dropout_fw: nn.Dropout) -> torch.Tensor:
        """w @ dropout_fw(a @ v + bias): the forward step's expanded rows (B, E, D), read back by the backward
        weights w (B, N, E). In eval mode it is computed as (w @ a) @ v + w @ bias: the same product with a third
        less arithmetic and no (B, E, D) tensor (the encoder 10% faster). Training keeps the order its runs were
        made with (a dropout may act on the rows; and a resumed run continues bitwise as it started)."""
        if self.training:
            return torch.matmul(w, dropout_fw(torch.baddbmm(bias, a, v)))
        return torch.baddbmm(torch.matmul(w, bias), torch.matmul(w, a), v)

    def _block_normalise(self, w: torch.Tensor) -> torch.Tensor:
        """Normalise each block of expanded rows on its own (a split, not an index_add: exportable to ONNX). Without
        gradients (eager) each block is written straight into its columns of the result instead of concatenated."""
        blocks = w.split(self.num_exp_list, dim=-1)
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return torch.cat([_normalise(block) for block in blocks], dim=-1)
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        for block, columns in zip(blocks, out.split(self.num_exp_list, dim=-1)):
            _normalise(block, out=columns)
        return out


class DynamicExpansionBlock(_ExpansionBlock):
    """Dynamic expansion over a causal token sequence; `step` processes one new position from a cache."""

    key_linear: nn.Linear

    def __init__(self, d_model: int, num_exp: int, dropout: float, gated: bool = False) -> None:
        super().__init__()
        self.num_exp = num_exp
        self.cond_embed = nn.Linear(d_model, d_model)
        self._add_expansion(d_model, num_exp, "key_linear", dropout, gated)

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
        ca = self.dropout_class_a_fw(torch.matmul(_normalise(F.relu(z) * fw_mask), va))
        cb = self.dropout_class_b_fw(torch.matmul(_normalise(F.relu(-z) * fw_mask), vb))
        zt = z.transpose(1, 2)  # (B, T, TE)
        bw_mask = causal.repeat_interleave(E, dim=1).to(z.dtype)  # (T, TE): row t reads expanded rows of s <= t
        oa = self.dropout_class_a_bw(torch.matmul(_normalise(F.relu(zt) * bw_mask), ca + be))
        ob = self.dropout_class_b_bw(torch.matmul(_normalise(F.relu(-zt) * bw_mask), cb + be))
        return self._select(x, oa, ob)

    def step(self, x: torch.Tensor, cache: DynamicExpansionCache | ConcatExpansionCache | FixedExpansionCache
             ) -> torch.Tensor:
        """One new position x (B, 1, D) after the cached ones; appends to the cache and returns (B, 1, D).

        Backward-step scores of the expanded rows (t, e) against the new key are K_j . cond_t + K_j . q_exp[e], and
        the biases b_exp[e] + cond_t enter the output through the weights' marginals, so neither expanded queries
        nor biases are cached. The past is reached only through the cache's append / scores / read / hide_unwritten,
        so a beam's shared rows (growing), the fixed-size buffers of a compiled step and the concatenated tensors of
        an exported graph run the same code. Decoding (eval mode) on a cache that keeps_forward_weights takes
        `_step_by_forward_weights` instead.
        """
        if cache.keeps_forward_weights and not self.training:
            return self._step_by_forward_weights(x, cache)
        E = self.num_exp
        scale = math.sqrt(x.shape[-1])
        cond = self.cond_embed(x)  # (B, 1, D)
        k_j = self.key_linear(x)
        va, vb = self.values(x)
        for name, rows in (("k", k_j), ("cond", cond), ("va", va), ("vb", vb)):
            cache.append(name, rows)
        # scores of position j's expanded queries q_exp[e] + cond_j against keys 0..j: (B, E, T)
        z = self.Z_dropout(cache.hide_unwritten(cache.scores("k", self.query_exp_vectors.weight + cond) / scale, 1))
        for c, w, drop_fw in (("a", F.relu(z), self.dropout_class_a_fw), ("b", F.relu(-z), self.dropout_class_b_fw)):
            cache.append("c" + c, drop_fw(cache.read("v" + c, _normalise(w))))  # (B, E, D)
        z_t = cache.scores("cond", k_j)  # (B, 1, T)
        z_e = torch.matmul(k_j, self.query_exp_vectors.weight.t())  # (B, 1, E)
        zb = self.Z_dropout(cache.hide_unwritten(((z_t[..., :, None] + z_e[..., None, :]) / scale).flatten(-2), E))
        outs = []
        for w, c, drop in ((_normalise(F.relu(zb)), "a", self.dropout_class_a_bw),
                           (_normalise(F.relu(-zb)), "b", self.dropout_class_b_bw)):
            w4 = w.unflatten(-1, (-1, E))  # (B, 1, T, E)
            bias = torch.matmul(w4.sum(2), self.bias_exp_vectors.weight) + cache.read("cond", w4.sum(3))
            outs.append(drop(cache.read("c" + c, w) + bias))
        return self._select(x, *outs)

    def _step_by_forward_weights(self, x: torch.Tensor, cache: DynamicExpansionCache) -> torch.Tensor:
        """`step` in eval mode (dropouts are identities) on a cache that keeps the forward step's weights: Ca = Fa @
        Va, so the cache keeps Fa (T columns, not D) and the backward step reads Va through it, w @ Ca = (w @ Fa) @
        Va; the shared expansion queries score each image's keys once; the two classes go through each operation
        together (a leading axis of 2), and the five input projections are one product (`linear_outputs`)."""
        E = self.num_exp
        scale = math.sqrt(x.shape[-1])
        q_exp = self.query_exp_vectors.weight
        cond, k_j, va, vb, s = linear_outputs(x, (self.cond_embed, self.key_linear, self.class_a_embed,
                                                  self.class_b_embed, self.selector_embed), self.__dict__)
        va, vb = self._gate(va, vb)
        cache.append("k", k_j)
        cache.append("cond", cond)
        cache.append("v", torch.cat((va, vb), dim=-1))
        z = cache.expansion_scores("k", q_exp, cond) / scale  # (B, E, T): q_exp[e] + cond against the keys
        cache.append("f", _normalise(F.relu(torch.stack((z, -z), dim=2))).transpose(2, 3))  # (B, E, T, 2)
        z_t = cache.scores("cond", k_j)  # (B, 1, T)
        z_e = torch.matmul(k_j, q_exp.t())  # (B, 1, E)
        zb = ((z_t[..., :, None] + z_e[..., None, :]) / scale).flatten(-2)  # (B, 1, T * E)
        w = _normalise(F.relu(torch.cat((zb, -zb), dim=1)))  # (B, 2, T * E): classes a, b
        w4 = w.unflatten(-1, (-1, E))  # (B, 2, T, E)
        bias = torch.matmul(w4.sum(2), self.bias_exp_vectors.weight) + cache.read("cond", w4.sum(3))
        out = cache.read_pairs("v", cache.read_pairs("f", w)) + bias  # (B, 2, D)
        return self._select(x, out[:, :1], out[:, 1:], selector=s)
