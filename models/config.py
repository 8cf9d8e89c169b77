"""Model configuration: plain frozen dataclasses that travel inside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

SWIN_L_384 = "swin_large_patch4_window12_384"
SWINV2_B_384 = "swinv2_base_window12to24_192to384"
MODEL_NAMES = ("optimizer_expansionnet", "expansionnet_v2")


@dataclass(frozen=True)
class BackboneConfig:
    """A timm backbone: its registry name plus constructor overrides (small test configs change width and depth)."""

    name: str
    img_size: int = 384
    drop_path_rate: float = 0.0
    overrides: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()}
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"backbone config: unknown fields {sorted(unknown)}")
        d = dict(d)
        d["overrides"] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get("overrides", {}).items()}
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a captioner; the three Optimizer-ExpansionNet changes are separate switches.

    memory_slots > 0 turns on memory-augmented attention (an encoder self-attention sub-layer and memory slots in the
    decoder cross-attention); mult_residual gates the expansion value projections; the backbone is a timm model.
    """

    name: str
    vocab_size: int
    max_seq_len: int
    d_model: int = 512
    N_enc: int = 3
    N_dec: int = 3
    num_heads: int = 8
    ff: int = 2048
    num_exp_enc_list: tuple[int, ...] = (32, 64, 128, 256, 512)
    num_exp_dec: int = 16
    img_feature_dim: int = 1536
    memory_slots: int = 0
    mult_residual: bool = False
    enc_drop: float = 0.0
    dec_drop: float = 0.0
    enc_input_drop: float = 0.0
    dec_input_drop: float = 0.0
    drop_other: float = 0.0
    backbone: BackboneConfig | None = None

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model name {self.name!r} is not one of {MODEL_NAMES}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        for key in ("vocab_size", "max_seq_len", "d_model", "N_enc", "N_dec", "ff", "num_exp_dec", "img_feature_dim"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model config: {key} must be positive, got {getattr(self, key)}")

    @property
    def end_to_end(self) -> bool:
        return self.backbone is not None

    def without_backbone(self) -> ModelConfig:
        """The same captioner working on cached features (the features model of phases 2 and 5)."""
        return replace(self, backbone=None)

    def with_dropouts(self, enc: float, dec: float, enc_input: float, dec_input: float, other: float) -> ModelConfig:
        return replace(self, enc_drop=enc, dec_drop=dec, enc_input_drop=enc_input, dec_input_drop=dec_input,
                       drop_other=other)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_exp_enc_list"] = list(self.num_exp_enc_list)
        d["backbone"] = self.backbone.to_dict() if self.backbone else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config: unknown fields {sorted(unknown)}")
        d = dict(d)
        d["num_exp_enc_list"] = tuple(d.get("num_exp_enc_list", cls.num_exp_enc_list))
        if d.get("backbone") is not None:
            d["backbone"] = BackboneConfig.from_dict(d["backbone"])
        return cls(**d)


def backbone_preset(name: str, img_size: int = 384, drop_path_rate: float = 0.0) -> BackboneConfig:
    """The full-size backbones of the two models: Swin-L/4 w12 (baseline) and SwinV2-B w12to24 (the seed's model)."""
    if name in ("swin_l", SWIN_L_384):
        return BackboneConfig(name=SWIN_L_384, img_size=img_size, drop_path_rate=drop_path_rate)
    if name in ("swinv2_b", SWINV2_B_384):
        return BackboneConfig(name=SWINV2_B_384, img_size=img_size, drop_path_rate=drop_path_rate)
    raise ValueError(f"unknown backbone preset {name!r}: use swin_l or swinv2_b")


def tiny_swinv2(img_size: int = 64, embed_dim: int = 32, depths: tuple[int, ...] = (1, 1, 1),
                window_size: int = 4) -> BackboneConfig:
    """A small SwinV2 for tests and the quickstart: same code path as the real one, a fraction of the cost."""
    heads = tuple(max(1, embed_dim * 2**i // 32) for i in range(len(depths)))
    return BackboneConfig(
        name=SWINV2_B_384,
        img_size=img_size,
        overrides={"embed_dim": embed_dim, "depths": tuple(depths), "num_heads": heads, "window_size": window_size},
    )


def expansionnet_v2_config(vocab_size: int = 10000, max_seq_len: int = 74, end_to_end: bool = True,
                           **overrides: Any) -> ModelConfig:
    """The baseline as released: 3 + 3 layers, Swin-L, no memory, no gating (loads the official checkpoint)."""
    cfg = ModelConfig(name="expansionnet_v2", vocab_size=vocab_size, max_seq_len=max_seq_len, N_enc=3, N_dec=3,
                      img_feature_dim=1536, backbone=backbone_preset("swin_l") if end_to_end else None)
    return replace(cfg, **overrides)


def optimizer_expansionnet_config(vocab_size: int = 10000, max_seq_len: int = 74, end_to_end: bool = True,
                                  **overrides: Any) -> ModelConfig:
    """The seed's model: SwinV2-B (1024 channels), memory-augmented attention (40 slots), gated values, 2 + 2 layers."""
    cfg = ModelConfig(name="optimizer_expansionnet", vocab_size=vocab_size, max_seq_len=max_seq_len, N_enc=2,
                      N_dec=2, img_feature_dim=1024, memory_slots=40, mult_residual=True,
                      backbone=backbone_preset("swinv2_b") if end_to_end else None)
    return replace(cfg, **overrides)
