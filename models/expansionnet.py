"""The ExpansionNet v2 captioner and its Optimizer-ExpansionNet variant (memory attention, gated expansion values).

Parameter names match the official release's `model_state_dict`; the backbone (`swin_transf`) is a timm model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.backbone import backbone_tokens
from models.cache import CrossAttentionCache, DecoderCache
from models.dynamic_expansion import (
    Ancestry,
    ConcatExpansionCache,
    DynamicExpansionBlock,
    FixedExpansionCache,
    ForwardWeightsCache,
    PrefixExpansionCache,
)
from models.layers import EmbeddingLayer, FeedForward, MultiHeadAttention, StaticExpansionBlock


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None when autocast is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class EncoderLayer(nn.Module):
    """Pre-LN: static expansion, [memory-augmented self-attention], feed-forward; each with a residual."""

    def __init__(self, d_model: int, d_ff: int, num_heads: int, num_exp_list: tuple[int, ...], dropout: float,
                 memory_slots: int, gated: bool) -> None:
        super().__init__()
        # registration order = the official state-dict order
        self.norm_1 = nn.LayerNorm(d_model)
        self.norm_2 = nn.LayerNorm(d_model)
        self.stc_exp = StaticExpansionBlock(d_model, num_exp_list, dropout, gated=gated)
        if memory_slots > 0:
            self.norm_mem = nn.LayerNorm(d_model)
            self.mem_attn = MultiHeadAttention(d_model, num_heads, memory_slots)
            self.dropout_mem = nn.Dropout(dropout)
        self.memory_slots = memory_slots
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.dropout_1 = nn.Dropout(dropout)
        self.dropout_2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout_1(self.stc_exp(self.norm_1(x), key_mask))
        if self.memory_slots > 0:
            y = self.norm_mem(x)
            x = x + self.dropout_mem(self.mem_attn(y, y, key_mask))
        return x + self.dropout_2(self.ff(self.norm_2(x)))


class DecoderLayer(nn.Module):
    """Pre-LN: dynamic expansion (causal), cross-attention to the encoder memory, feed-forward."""

    def __init__(self, d_model: int, d_ff: int, num_heads: int, num_exp: int, dropout: float, memory_slots: int,
                 gated: bool) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(d_model)
        self.norm_2 = nn.LayerNorm(d_model)
        self.norm_3 = nn.LayerNorm(d_model)
        self.mha = MultiHeadAttention(d_model, num_heads, memory_slots)
        self.dyn_exp = DynamicExpansionBlock(d_model, num_exp, dropout, gated=gated)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.dropout_1 = nn.Dropout(dropout)
        self.dropout_2 = nn.Dropout(dropout)
        self.dropout_3 = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, cross: CrossAttentionCache) -> torch.Tensor:
        """h (B, T, D); cross holds the projected memory of the same B images."""
        h = h + self.dropout_1(self.dyn_exp(self.norm_1(h)))
        h = h + self.dropout_2(self.mha.attend(self.norm_2(h), cross.k, cross.v, cross.bias))
        return h + self.dropout_3(self.ff(self.norm_3(h)))

    def step(self, h: torch.Tensor, cross: CrossAttentionCache,
             dyn: ForwardWeightsCache | PrefixExpansionCache | FixedExpansionCache | ConcatExpansionCache
             ) -> torch.Tensor:
        """h (B*group, 1, D), one new position; cross holds B images, each shared by the group of hypotheses that
        follow it (rows b*group .. (b+1)*group-1)."""
        h = h + self.dropout_1(self.dyn_exp.step(self.norm_1(h), dyn))
        q = self.norm_2(h).reshape(cross.k.shape[0], -1, h.shape[-1])  # (B, group, D): hypotheses act as queries
        h = h + self.dropout_2(self.mha.attend(q, cross.k, cross.v, cross.bias).reshape(h.shape))
        return h + self.dropout_3(self.ff(self.norm_3(h)))


class ExpansionNet(nn.Module):
    """Encoder-decoder captioner over image tokens, with an optional backbone in front (end-to-end).

    Inputs are either images (B, 3, H, W) (needs a backbone) or features (B, N, img_feature_dim). `forward` returns
    raw logits (B, T, V); decoding algorithms live in models/decoding.py and use encode / init_cache / decode_step.
    Build it from a ModelConfig with models.build_model: the config holds every default (models/config.py).
    """

    def __init__(self, *, vocab_size: int, max_seq_len: int, d_model: int, N_enc: int, N_dec: int, num_heads: int,
                 ff: int, num_exp_enc_list: tuple[int, ...], num_exp_dec: int, img_feature_dim: int, memory_slots: int,
                 mult_residual: bool, memory_init: str, enc_drop: float = 0.0, dec_drop: float = 0.0,
                 enc_input_drop: float = 0.0, dec_input_drop: float = 0.0, drop_other: float = 0.0,
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        if backbone is not None:
            self.swin_transf = backbone
        self.encoders = nn.ModuleList([
            EncoderLayer(d_model, ff, num_heads, num_exp_enc_list, enc_drop, memory_slots, mult_residual)
            for _ in range(N_enc)])
        self.decoders = nn.ModuleList([
            DecoderLayer(d_model, ff, num_heads, num_exp_dec, dec_drop, memory_slots, mult_residual)
            for _ in range(N_dec)])
        self.input_embedder_dropout = nn.Dropout(enc_input_drop)
        self.input_linear = nn.Linear(img_feature_dim, d_model)
        self.vocab_linear = nn.Linear(d_model, vocab_size)
        self.out_enc_dropout = nn.Dropout(drop_other)
        self.out_dec_dropout = nn.Dropout(drop_other)
        self.out_embedder = EmbeddingLayer(vocab_size, d_model, dec_input_drop)
        self.pos_encoder = nn.Embedding(max_seq_len, d_model)
        self.enc_reduce_group = nn.Linear(d_model * N_enc, d_model)
        self.enc_reduce_norm = nn.LayerNorm(d_model)
        self.dec_reduce_group = nn.Linear(d_model * N_dec, d_model)
        self.dec_reduce_norm = nn.LayerNorm(d_model)
        self.d_model = d_model
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.num_exp_dec = num_exp_dec
        self._init_captioner_weights(memory_init)

    def _init_captioner_weights(self, memory_init: str) -> None:
        """Xavier-uniform on every captioner matrix (the reference's init), then the memory slots and the biases of
        memory-augmented attention as `memory_init` says; the backbone keeps timm's init."""
        for name, p in self.named_parameters():
            if not name.startswith("swin_transf.") and p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MultiHeadAttention) and module.memory_slots > 0:
                module.reset_memory(memory_init)

    @property
    def backbone(self) -> nn.Module | None:
        return getattr(self, "swin_transf", None)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> backbone tokens (B, N, C)."""
        if self.backbone is None:
            raise ValueError("this captioner works on cached features: it has no backbone to run on images")
        return backbone_tokens(self.backbone, images)

    def encode(self, features: torch.Tensor | None = None, images: torch.Tensor | None = None,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder memory (B, N, D) from features (B, N, C) or images; key_mask (B, N) marks real feature tokens."""
        if (features is None) == (images is None):
            raise ValueError("encode takes exactly one of features or images")
        if images is not None:
            features = self.forward_features(images)
        x = self.input_embedder_dropout(self.input_linear(features))
        outs = []
        for layer in self.encoders:
            x = layer(x, key_mask)
            outs.append(x)
        x = x + self.out_enc_dropout(self.enc_reduce_group(torch.cat(outs, dim=-1)))
        return self.enc_reduce_norm(x)

    def cross_caches(self, memory: torch.Tensor, key_mask: torch.Tensor | None) -> list[CrossAttentionCache]:
        """Project the memory once per decoder layer (keys/values for every later decoding step)."""
        return [CrossAttentionCache(*layer.mha.project_kv(memory, key_mask)) for layer in self.decoders]

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.out_embedder(tokens) + self.pos_encoder(positions)

    def _head(self, outs: list[torch.Tensor]) -> torch.Tensor:
        h = outs[-1] + self.out_dec_dropout(self.dec_reduce_group(torch.cat(outs, dim=-1)))
        return self.vocab_linear(self.dec_reduce_norm(h))

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None = None,
               caption_index: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (K, T, V) for token prefixes (K, T) starting with SOS; right padding is harmless.

        memory (B, N, D) holds B images; caption_index (K,) says which image each caption reads (default: row k),
        so an image's memory is projected once however many captions it has.
        """
        T = tokens.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model's max_seq_len {self.max_seq_len}")
        cross = self.cross_caches(memory, key_mask)
        if caption_index is not None:
            cross = [CrossAttentionCache(c.k.index_select(0, caption_index), c.v.index_select(0, caption_index),
                                         c.bias.index_select(0, caption_index) if c.bias is not None else None)
                     for c in cross]
        h = self._embed(tokens, torch.arange(T, device=tokens.device))
        outs = []
        for layer, c in zip(self.decoders, cross):
            h = layer(h, c)
            outs.append(h)
        return self._head(outs)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor | None = None, images: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, caption_index: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (K, T, V) for decoder inputs tokens (K, T) over B images (see decode)."""
        memory = self.encode(features=features, images=images, key_mask=key_mask)
        return self.decode(tokens, memory, key_mask, caption_index)

    def init_cache(self, memory: torch.Tensor, key_mask: torch.Tensor | None, group: int,
                   max_len: int, fixed: bool = False, reorders: bool = True) -> DecoderCache:
        """State for incremental decoding of `group` hypotheses per image, up to max_len positions (SOS included).

        The dynamic expansion's cache type (and with it the step that runs) is chosen here, once: fixed: buffers
        whose shapes never change (FixedExpansionCache), for a compiled step; else in training mode each
        hypothesis's own rows (PrefixExpansionCache: the dropouts act on them), in eval mode forward weights with
        a beam's rows shared (ForwardWeightsCache). Under autocast the caches take autocast's dtype, which the
        step's rows have (CUDA's autocast keeps the memory itself in fp32). reorders=False (sampling, greedy
        search): the hypotheses never change rows, so each keeps its own plain cache (a group of one in the
        Ancestry's terms). A search that re-orders (beam search) runs in eval mode.
        """
        if max_len > self.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {self.max_seq_len}")
        if reorders and self.training:
            raise ValueError("a search that re-orders its hypotheses (beam search) decodes in eval mode: call "
                             "model.eval() first (training-mode caches serve sampling, reorders=False)")
        images, device = memory.shape[0], memory.device
        dtype = _autocast_dtype(device) or memory.dtype
        cross = self.cross_caches(memory, key_mask)
        if fixed or self.training:
            kind = FixedExpansionCache if fixed else PrefixExpansionCache
            rows = [kind(images * group, max_len, self.num_exp_dec, self.d_model, device, dtype) for _ in self.decoders]
            return DecoderCache(cross, rows, group, max_len, reorders=reorders)
        ancestry = Ancestry(images, group, max_len, device) if reorders else \
            Ancestry(images * group, 1, max_len, device)
        dyn = [ForwardWeightsCache(ancestry, max_len, self.num_exp_dec, self.d_model, device, dtype)
               for _ in self.decoders]
        return DecoderCache(cross, dyn, group, max_len, ancestry, reorders)

    def decode_step(self, tokens: torch.Tensor, cache: DecoderCache, step: Callable[..., torch.Tensor] | None = None
                    ) -> torch.Tensor:
        """Logits (B*group, V) for the next token after `tokens` (B*group,), the newest input position.

        step: what computes it, with `self.step`'s arguments (default: self.step; a compiled one for instance)."""
        j = cache.length
        if j >= cache.max_len:
            raise ValueError(f"decoder cache is full ({cache.max_len} positions)")
        position = torch.full((1,), j, device=tokens.device, dtype=torch.long)
        logits = (step or self.step)(tokens, position, cache.cross, cache.dyn)
        cache.advance()
        return logits

    def step(self, tokens: torch.Tensor, position: torch.Tensor, cross: list[CrossAttentionCache],
             dyn: list[ForwardWeightsCache] | list[PrefixExpansionCache] | list[FixedExpansionCache]
             | list[ConcatExpansionCache]) -> torch.Tensor:
        """One decoding step: logits (B*group, V) for tokens (B*group,) at position (1,), appending to each layer's
        dynamic-expansion cache, whose own step runs. decode_step runs it on init_cache's caches; an exported
        decoder-step graph runs it on ConcatExpansionCache (past caches in, present caches out)."""
        h = self._embed(tokens[:, None], position)
        outs = []
        for layer, c, d in zip(self.decoders, cross, dyn):
            h = layer.step(h, c, d)
            outs.append(h)
        return self._head(outs)[:, 0]
