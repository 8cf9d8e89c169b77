"""Adapters for the official ExpansionNet v2 release: its model config and its state-dict layout."""

from __future__ import annotations

import re

import torch
from torch import nn

from models.backbone import filter_backbone_state_dict
from models.config import ModelConfig, backbone_preset, model_config


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the DDP `module.` and torch.compile `_orig_mod.` prefixes."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def official_model_config(state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Rebuild the config of an official checkpoint from its tensor shapes (the release stores no config)."""
    sd = clean_state_dict(state_dict)
    try:
        d_model = sd["input_linear.weight"].shape[0]
        img_feature_dim = sd["input_linear.weight"].shape[1]
        vocab_size = sd["vocab_linear.weight"].shape[0]
        max_seq_len = sd["pos_encoder.weight"].shape[0]
        ff = sd["encoders.0.ff.linear_1.weight"].shape[0]
        num_exp_total = sd["encoders.0.stc_exp.query_exp_vectors.weight"].shape[0]
        num_exp_dec = sd["decoders.0.dyn_exp.query_exp_vectors.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an ExpansionNet v2 state dict: key {e} is missing") from e
    n_enc = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoders\.(\d+)\.", k)))
    n_dec = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoders\.(\d+)\.", k)))
    default_exp = (32, 64, 128, 256, 512)
    if num_exp_total != sum(default_exp):
        raise ValueError(f"official checkpoint with {num_exp_total} static expansion rows; only the released "
                         f"{default_exp} (sum {sum(default_exp)}) can be inferred")
    backbone = None
    if any(k.startswith("swin_transf.") for k in sd):
        width = sd["swin_transf.patch_embed.proj.weight"].shape[0]
        if width != 192:
            raise ValueError(f"official checkpoint backbone has embed_dim {width}; the release uses Swin-L (192)")
        backbone = backbone_preset("swin_l")
    return model_config("expansionnet_v2", vocab_size=vocab_size, max_seq_len=max_seq_len, d_model=d_model,
                        N_enc=n_enc, N_dec=n_dec, ff=ff, num_exp_enc_list=default_exp, num_exp_dec=num_exp_dec,
                        img_feature_dim=img_feature_dim, backbone=backbone)


def official_checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The official `model_state_dict` -> this model's layout.

    Captioner keys are identical by construction; the Microsoft-layout Swin keys under `swin_transf.` go through
    timm's filter (downsample moved to the next stage, non-learned buffers such as attn_mask dropped).
    """
    state_dict = clean_state_dict(state_dict)
    captioner = {k: v for k, v in state_dict.items() if not k.startswith("swin_transf.")}
    swin = {k[len("swin_transf."):]: v for k, v in state_dict.items() if k.startswith("swin_transf.")}
    backbone = getattr(model, "swin_transf", None)
    if swin and backbone is not None:
        swin = filter_backbone_state_dict(swin, backbone)
        captioner.update({"swin_transf." + k: v for k, v in swin.items()})
    return captioner
