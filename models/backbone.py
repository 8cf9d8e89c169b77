"""timm backbones: the named sizes (Swin, SwinV2, the quickstart's ResNet) or any timm model by name that gives a
feature map or tokens, created without downloads, and adapters for foreign weights (Microsoft, timm, ours)."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from models.config import BackboneConfig, backbone_preset
from utils.checkpoint import state_dict_differences
from utils.cli import closest


class BackboneWeightsError(ValueError):
    """A backbone state dict that does not fit the configured backbone."""


def create_backbone(cfg: BackboneConfig, published: dict[str, Any] | None = None) -> nn.Module:
    """A timm model with no classifier head: random weights, or with published given, the model's published weights
    loaded by timm's own code (pretrained=True; published is timm's pretrained_cfg overlay, {} for its default
    source, {"file": ...} for a local copy).

    Transformers are built for cfg.img_size; convolutional families take any input size and no img_size argument.
    """
    import timm  # here, not at the top: timm and the torchvision behind it take 2 s to import, which the feature
    # phases and every --help would pay without building a backbone

    kwargs = {"pretrained": published is not None, "num_classes": 0, "drop_path_rate": cfg.drop_path_rate,
              **({"pretrained_cfg_overlay": published} if published else {}), **cfg.overrides}
    try:
        return timm.create_model(cfg.name, img_size=cfg.img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(cfg.name, **kwargs)


def timm_backbone_config(name: str, img_size: int = 0) -> BackboneConfig:
    """Any timm model as a backbone: its input side, mean and std from timm's data config for its published weights
    (resolve_model_data_config), the side changed to img_size when given (transformers are then built for it).
    Refused with one line: a name timm does not know (with the closest it does), a model whose features are a
    pooled vector rather than a feature map or tokens."""
    import timm  # here, not at the top: see create_backbone

    if not timm.is_model(name):
        hint = closest(name, timm.list_models())
        raise ValueError(f"--timm {name}: timm {timm.__version__} has no such model"
                         + (f"; did you mean {hint}?" if hint else " (timm.list_models() lists them)"))
    with torch.device("meta"):
        data = timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False, num_classes=0))
    cfg = BackboneConfig(name=name, img_size=img_size or int(data["input_size"][-1]),
                         mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]))
    with torch.device("meta"):
        features = create_backbone(cfg).forward_features(torch.empty(1, 3, cfg.img_size, cfg.img_size))
    if features.dim() not in (3, 4):
        raise ValueError(f"--timm {name}: its forward_features gives a {tuple(features.shape)} tensor, not a feature "
                         "map (B, C, H, W) or tokens (B, N, C) a captioner can attend over")
    return cfg


def published_source(name: str) -> str:
    """Where timm publishes a model's weights (a Hugging Face Hub page or a URL), or '' when it names none."""
    import timm  # here, not at the top: see create_backbone

    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return ""
    return f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or "")


def backbone_output_shape(cfg: BackboneConfig) -> tuple[int, int]:
    """(tokens, channels) of the backbone's output at its image size, computed on the meta device (no weights)."""
    with torch.device("meta"):
        out = backbone_tokens(create_backbone(cfg), torch.empty(1, 3, cfg.img_size, cfg.img_size))
    return out.shape[1], out.shape[2]


def backbone_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) -> tokens (B, H' * W', C) of the last stage: timm's Swin gives NHWC (its `output_fmt`),
    convolutional families NCHW; a (B, N, C) sequence passes through."""
    feats = backbone.forward_features(images)
    if feats.dim() == 4:
        if str(getattr(getattr(backbone, "output_fmt", "NCHW"), "value", getattr(backbone, "output_fmt", "NCHW"))) \
                == "NHWC":
            return feats.flatten(1, 2)  # (B, H', W', C) -> (B, H'W', C)
        return feats.flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'W', C)
    return feats


def filter_backbone_state_dict(state_dict: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Microsoft or timm weights -> the timm layout of `backbone`.

    The classifier (head keys the backbone lacks) is dropped and non-learned buffers are skipped; timm's own
    checkpoint_filter_fn moves the downsample layers of Microsoft's layout and resizes relative-position tables when
    the window differs.
    """
    own = backbone.state_dict().keys()  # a head's norm that pooling uses (ConvNeXt's head.norm) stays

    def drop_classifier(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in weights.items() if not k.startswith("head.") or k in own}

    family = importlib.import_module(type(backbone).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    state_dict = drop_classifier(state_dict)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, backbone)
    return drop_classifier(state_dict)


def load_backbone_state_dict(backbone: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load filtered weights strictly (apart from buffers timm recomputes); say what differs when they do not fit."""
    state_dict = filter_backbone_state_dict(state_dict, backbone)
    problems = state_dict_differences(backbone.state_dict(), state_dict)
    if problems:
        raise BackboneWeightsError(f"backbone weights in {source} do not fit {type(backbone).__name__}: "
                                   + "; ".join(problems) + ". Is this the right backbone file for this model?")
    backbone.load_state_dict(state_dict, strict=True)


def infer_backbone_config(state_dict: dict[str, torch.Tensor], img_size: int = 384) -> BackboneConfig:
    """Recognise the two full-size Swin files by their shapes (Microsoft or timm layout): SwinV2-B or Swin-L.

    Other backbones need a backbone file written by this project, which stores its config.
    """
    width = state_dict.get("patch_embed.proj.weight")
    if width is None:
        raise BackboneWeightsError("not a Swin state dict: patch_embed.proj.weight is missing")
    width = width.shape[0]
    is_v2 = any("cpb_mlp" in k or k.endswith("logit_scale") for k in state_dict)
    if is_v2 and width == 128:
        return backbone_preset("swinv2_b", img_size=img_size)
    if not is_v2 and width == 192:
        return backbone_preset("swin_l", img_size=img_size)
    raise BackboneWeightsError(f"unrecognised Swin {'V2' if is_v2 else 'V1'} backbone with embed_dim {width}; "
                               "use SwinV2-B (the seed's model), Swin-L (the baseline), or a backbone file written by "
                               "this project (it records its own config)")
