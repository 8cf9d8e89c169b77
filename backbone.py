"""Backbone files (the format phases 1 and 3 read): create one from scratch, convert a timm or Microsoft checkpoint,
pretrain one on a dataset's own labels (the quickstart's phase 0), or describe one.

    python backbone.py create --size quickstart --output_path backbone.pth
    python backbone.py create --timm convnext_tiny --pretrained --output_path convnext_tiny.pth   # timm's weights
    python backbone.py create --timm convnext_tiny --pretrained --weights model.safetensors \
        --output_path convnext_tiny.pth
    python backbone.py convert --weights swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth \
        --output_path swinv2_b.pth
    python backbone.py pretrain --init quickstart --images_path data/ --captions_path data/captions.json \\
        --output_path phase0/backbone.pth
    python backbone.py info --path backbone.pth
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data.records import DatasetError
from deploy.checkpoints import CheckpointError, read_backbone_file, save_backbone_file
from engine.pretrain import PretrainConfig, pretrain, published_backbone
from models.backbone import backbone_output_shape, create_backbone, load_backbone_state_dict, timm_backbone_config
from models.config import BACKBONE_SIZES, BackboneConfig, backbone_preset
from utils.cli import ArgumentParser, add_dataclass_flags, dataclass_values, plain_warnings
from utils.fields import option


@dataclass(frozen=True)
class CreateConfig:
    """`backbone.py create`: a named size with random weights, or any timm model by name (its input size and
    normalisation from timm's data config), random or with its published weights."""

    size: str = option("", "a named backbone (random weights)", choices=("", *sorted(BACKBONE_SIZES)), group="model")
    timm: str = option("", "any timm model that gives a feature map or tokens (convnext_tiny, resnet50, "
                       "efficientnet_b0, vit_small_patch16_224, swinv2_tiny_window8_256, ...)", group="model")
    pretrained: bool = option(False, "--timm: load the model's published weights through timm (from --weights, else "
                              "from timm's source when the network allows)", group="model")
    weights: str = option("", "--timm --pretrained: a local file of those weights (.safetensors, .bin or .pth as "
                          "published)", group="data")
    img_size: int = option(0, "input side in pixels (0: the model's own)", group="model")
    seed: int = option(0, "random seed of the weights", group="model")
    output_path: str = option("", "backbone file to write", aliases=("--output",), required=True, group="data")

    def problem(self) -> str:
        """What is wrong with the combination of flags, or ''."""
        if bool(self.size) == bool(self.timm):
            return "give one of --size (a named backbone) or --timm NAME (any timm model)"
        if self.pretrained and not self.timm:
            return "--pretrained loads a timm model's published weights: use it with --timm NAME"
        if self.weights and not self.pretrained:
            return "--weights is the file of --pretrained's weights: add --pretrained"
        return ""


@dataclass(frozen=True)
class ConvertConfig:
    """`backbone.py convert`: weights of Microsoft's or timm's Swin (SwinV2-B, Swin-L), an end-to-end checkpoint, or
    a backbone file, rewritten as a backbone file that records its config."""

    weights: str = option("", "the weights to convert", required=True, group="data")
    img_size: int = option(0, "input side in pixels (0: 384 for the full-size Swins, else the file's own)",
                           group="model")
    output_path: str = option("", "backbone file to write", aliases=("--output",), required=True, group="data")


@dataclass(frozen=True)
class InfoConfig:
    """`backbone.py info`: what a backbone file holds."""

    path: str = option("", "a backbone file, a Swin checkpoint or an end-to-end checkpoint", required=True,
                       group="data")


COMMANDS = {"create": CreateConfig, "convert": ConvertConfig, "pretrain": PretrainConfig, "info": InfoConfig}


def parse_config(argv: list[str] | None = None) -> tuple[str, object]:
    parser = ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name, cls in COMMANDS.items():
        add_dataclass_flags(sub.add_parser(name, help=(cls.__doc__ or "").splitlines()[0],
                                           description=cls.__doc__), cls)
    args = parser.parse_args(argv)
    cls = COMMANDS[args.command]
    cfg = cls(**dataclass_values(args, cls))
    if isinstance(cfg, CreateConfig) and cfg.problem():
        parser.error(f"create: {cfg.problem()}")
    return args.command, cfg


def describe(bb: BackboneConfig, backbone: torch.nn.Module) -> str:
    tokens, channels = backbone_output_shape(bb)
    params = sum(p.numel() for p in backbone.parameters())
    return (f"{bb.name} {json.dumps(bb.overrides)} at {bb.img_size} px: {params / 1e6:.2f}M parameters, "
            f"{tokens} tokens of {channels} channels")


def create(cfg: CreateConfig) -> Path:
    torch.manual_seed(cfg.seed)
    bb = timm_backbone_config(cfg.timm, cfg.img_size) if cfg.timm else backbone_preset(cfg.size, img_size=cfg.img_size)
    backbone = published_backbone(bb, cfg.weights) if cfg.pretrained else create_backbone(bb)
    print(describe(bb, backbone) + (f", mean {bb.mean} std {bb.std}" if cfg.timm else "")
          + (", published weights" if cfg.pretrained else ", random weights"))
    return save_backbone_file(cfg.output_path, backbone, bb)


def convert(cfg: ConvertConfig) -> Path:
    bb, state = read_backbone_file(cfg.weights, img_size=cfg.img_size or None)
    if cfg.img_size:
        bb = BackboneConfig.from_dict({**bb.to_dict(), "img_size": cfg.img_size})
    backbone = create_backbone(bb)
    load_backbone_state_dict(backbone, state, cfg.weights)
    print(describe(bb, backbone))
    return save_backbone_file(cfg.output_path, backbone, bb)


def info(cfg: InfoConfig) -> None:
    bb, state = read_backbone_file(cfg.path)
    backbone = create_backbone(bb)
    load_backbone_state_dict(backbone, state, cfg.path)
    print(describe(bb, backbone))


def main(command: str, cfg: object) -> int:
    if command == "create":
        print(f"wrote {create(cfg)}")
    elif command == "convert":
        print(f"wrote {convert(cfg)}")
    elif command == "pretrain":
        pretrain(cfg)
    else:
        info(cfg)
    return 0


if __name__ == "__main__":
    plain_warnings()
    try:
        sys.exit(main(*parse_config()))
    except (CheckpointError, DatasetError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
