"""ExpansionNet building blocks: static expansion and what the dynamic one shares with it, (memory-augmented)
attention, feed-forward, embedding. The dynamic expansion and its cached steps: models/dynamic_expansion.py.

Parameter names follow the official ExpansionNet v2 release so its checkpoint loads by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EXP_EPS = 1e-9  # normalisation epsilon of the expansion blocks (the reference's value)


def _eps(dtype: torch.dtype) -> float:
    """EXP_EPS, raised to the smallest normal number where the dtype cannot hold it (fp16: 1e-9 would round to 0
    and an all-zero row would divide 0 by 0); float32 and bfloat16 keep the reference's 1e-9 exactly."""
    return max(EXP_EPS, torch.finfo(dtype).tiny)


def normalise(x: torch.Tensor, dim: int = -1, out: torch.Tensor | None = None) -> torch.Tensor:
    """x divided by its sum along dim (plus the expansion blocks' epsilon)."""
    return torch.div(x, x.sum(dim=dim, keepdim=True) + _eps(x.dtype), out=out)


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


class ExpansionBlock(nn.Module):
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
        return self.gate(self.class_a_embed(x), self.class_b_embed(x))

    def gate(self, va: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The multiplicative residual embedding of the two classes' values, where the block has one."""
        if self.gated:
            va = va * torch.sigmoid(self.class_a_gate(va))
            vb = vb * torch.sigmoid(self.class_b_gate(vb))
        return va, vb

    def select(self, x: torch.Tensor, oa: torch.Tensor, ob: torch.Tensor, selector: torch.Tensor | None = None
               ) -> torch.Tensor:
        """The selector's per-feature mix of the two classes' outputs (selector: its projection of x, if made)."""
        s = torch.sigmoid(self.selector_embed(x) if selector is None else selector)
        return s * oa + (1 - s) * ob


class StaticExpansionBlock(ExpansionBlock):
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
        oa = self.dropout_class_a_bw(self._read_back(wa, normalise(za), va, bias, self.dropout_class_a_fw)
                                     / num_blocks)
        ob = self.dropout_class_b_bw(self._read_back(wb, normalise(zb), vb, bias, self.dropout_class_b_fw)
                                     / num_blocks)
        return self.select(x, oa, ob)

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
            return torch.cat([normalise(block) for block in blocks], dim=-1)
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        for block, columns in zip(blocks, out.split(self.num_exp_list, dim=-1)):
            normalise(block, out=columns)
        return out
