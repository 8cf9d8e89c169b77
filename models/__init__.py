"""Networks: the ExpansionNet captioners, their timm backbones, incremental-decoding caches and search algorithms."""

from __future__ import annotations

from torch import nn

from models.backbone import create_backbone
from models.config import (
    BackboneConfig,
    ModelConfig,
    expansionnet_v2_config,
    model_config,
    optimizer_expansionnet_config,
    tiny_swinv2,
)
from models.expansionnet import ExpansionNet
from models.official import clean_state_dict, official_checkpoint_filter_fn, official_model_config

__all__ = [
    "BackboneConfig",
    "ExpansionNet",
    "ModelConfig",
    "build_model",
    "clean_state_dict",
    "count_parameters",
    "expansionnet_v2_config",
    "model_config",
    "official_checkpoint_filter_fn",
    "official_model_config",
    "optimizer_expansionnet_config",
    "tiny_swinv2",
]


def build_model(cfg: ModelConfig) -> ExpansionNet:
    """The only place that turns a ModelConfig into constructor keyword arguments."""
    backbone = create_backbone(cfg.backbone) if cfg.backbone is not None else None
    return ExpansionNet(
        vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, d_model=cfg.d_model, N_enc=cfg.N_enc,
        N_dec=cfg.N_dec, num_heads=cfg.num_heads, ff=cfg.ff, num_exp_enc_list=cfg.num_exp_enc_list,
        num_exp_dec=cfg.num_exp_dec, img_feature_dim=cfg.img_feature_dim, memory_slots=cfg.memory_slots,
        mult_residual=cfg.mult_residual, memory_init=cfg.memory_init, enc_drop=cfg.enc_drop, dec_drop=cfg.dec_drop,
        enc_input_drop=cfg.enc_input_drop, dec_input_drop=cfg.dec_input_drop, drop_other=cfg.drop_other,
        backbone=backbone)


def count_parameters(model: nn.Module, prefix: str | None = None) -> int:
    """Number of parameters, optionally only those whose name starts with prefix."""
    return sum(p.numel() for n, p in model.named_parameters() if prefix is None or n.startswith(prefix))
