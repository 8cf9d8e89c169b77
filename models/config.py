"""Model configuration: the one home of every model hyperparameter and its default; travels inside checkpoints.

`ModelConfig`'s defaults are the seed's model (Optimizer-ExpansionNet); `MODEL_VARIANTS` lists what the baseline
changes. Fields marked `option(...)` become command-line flags of train.py (utils.cli.add_dataclass_flags).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from utils.fields import described_fields, option

SWIN_L_384 = "swin_large_patch4_window12_384"
SWINV2_B_384 = "swinv2_base_window12to24_192to384"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneConfig:
    """A timm backbone: its registry name, constructor overrides (small configs change width and depth), and the
    preprocessing it expects (input side, mean and std); data/ and models/ read them from here."""

    name: str
    img_size: int = 384
    drop_path_rate: float = 0.0
    overrides: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()}
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        _refuse_unknown(cls, d, "backbone config")
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
    vocab_size and max_seq_len come from the data, img_feature_dim from the backbone or the feature file.
    """

    name: str = "optimizer_expansionnet"
    vocab_size: int = 10000
    max_seq_len: int = 74
    d_model: int = option(512, "width of every captioner layer", flag="model_dim", group="model")
    N_enc: int = option(2, "encoder layers", group="model")
    N_dec: int = option(2, "decoder layers", group="model")
    num_heads: int = option(8, "attention heads", group="model")
    ff: int = option(2048, "feed-forward width", group="model")
    num_exp_enc_list: tuple[int, ...] = option((32, 64, 128, 256, 512), "static expansion lengths of the encoder, "
                                               "e.g. [32,64,128]", group="model")
    num_exp_dec: int = option(16, "dynamic expansion length of the decoder", group="model")
    img_feature_dim: int = 1024
    memory_slots: int = option(40, "memory slots of memory-augmented attention (0: plain attention)", group="model")
    memory_init: str = option("xavier", "initialisation of the memory slots: xavier (the sibling project's, whose "
                              "numbers the seed reports) or m2 (the Meshed-Memory Transformer's)",
                              choices=("xavier", "m2"), group="model")
    mult_residual: bool = option(True, "multiplicative residual embedding (gated expansion values)", group="model")
    enc_drop: float = option(0.1, "dropout inside the encoder layers", group="optimisation")
    dec_drop: float = option(0.1, "dropout inside the decoder layers", group="optimisation")
    enc_input_drop: float = option(0.1, "dropout after the input projection of the features", group="optimisation")
    dec_input_drop: float = option(0.1, "dropout of the word embeddings", group="optimisation")
    drop_other: float = option(0.1, "dropout of the layer-combining projections", group="optimisation")
    backbone: BackboneConfig | None = None

    def __post_init__(self) -> None:
        if self.name not in MODEL_VARIANTS:
            raise ValueError(f"model name {self.name!r} is not one of {tuple(MODEL_VARIANTS)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        for key in ("vocab_size", "max_seq_len", "d_model", "N_enc", "N_dec", "ff", "num_exp_dec", "img_feature_dim"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model config: {key} must be positive, got {getattr(self, key)}")
        if self.memory_slots < 0 or not self.num_exp_enc_list or min(self.num_exp_enc_list) <= 0:
            raise ValueError("model config: memory_slots must be >= 0 and num_exp_enc_list positive lengths")
        if self.memory_init not in ("xavier", "m2"):
            raise ValueError(f"model config: memory_init must be xavier or m2, got {self.memory_init!r}")

    @property
    def end_to_end(self) -> bool:
        return self.backbone is not None

    def without_backbone(self) -> ModelConfig:
        """The same captioner working on cached features (the features model of phases 2 and 5)."""
        return replace(self, backbone=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_exp_enc_list"] = list(self.num_exp_enc_list)
        d["backbone"] = self.backbone.to_dict() if self.backbone else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A stored config (fields a checkpoint predates take their defaults)."""
        _refuse_unknown(cls, d, "model config")
        d = dict(d)
        d["num_exp_enc_list"] = tuple(d.get("num_exp_enc_list", cls.num_exp_enc_list))
        if d.get("backbone") is not None:
            d["backbone"] = BackboneConfig.from_dict(d["backbone"])
        return cls(**d)


# what each named model changes from ModelConfig's defaults (the seed's model)
MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    "optimizer_expansionnet": {},
    "expansionnet_v2": {"N_enc": 3, "N_dec": 3, "memory_slots": 0, "mult_residual": False, "img_feature_dim": 1536},
}
MODEL_NAMES = tuple(MODEL_VARIANTS)
HYPERPARAMETERS = tuple(f.name for f in described_fields(ModelConfig))
DROPOUTS = ("enc_drop", "dec_drop", "enc_input_drop", "dec_input_drop", "drop_other")  # may change between phases


def _refuse_unknown(cls: type, d: dict[str, Any], what: str) -> None:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{what}: unknown fields {sorted(unknown)}")


def model_config(name: str = "optimizer_expansionnet", **overrides: Any) -> ModelConfig:
    """The named model's config with overrides (None values are ignored: 'not given on the command line')."""
    if name not in MODEL_VARIANTS:
        raise ValueError(f"unknown model {name!r}: use one of {MODEL_NAMES}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return ModelConfig(name=name, **{**MODEL_VARIANTS[name], **given})


def backbone_preset(name: str, img_size: int = 0, drop_path_rate: float = 0.0) -> BackboneConfig:
    """A named backbone (BACKBONE_SIZES) at its own input side, or at img_size when given."""
    aliases = {SWIN_L_384: "swin_l", SWINV2_B_384: "swinv2_b"}
    key = aliases.get(name, name)
    if key not in BACKBONE_SIZES:
        raise ValueError(f"unknown backbone size {name!r}: use one of {sorted(BACKBONE_SIZES)}")
    cfg = BACKBONE_SIZES[key]
    return replace(cfg, img_size=img_size or cfg.img_size, drop_path_rate=drop_path_rate)


def tiny_swinv2(img_size: int = 64, embed_dim: int = 32, depths: tuple[int, ...] = (1, 1, 1),
                window_size: int = 4) -> BackboneConfig:
    """A small SwinV2 for tests: same code path as the real one, a fraction of the cost."""
    heads = tuple(max(1, embed_dim * 2**i // 32) for i in range(len(depths)))
    return BackboneConfig(
        name=SWINV2_B_384,
        img_size=img_size,
        overrides={"embed_dim": embed_dim, "depths": tuple(depths), "num_heads": heads, "window_size": window_size},
    )


# named backbones: the two full-size ones of the recipes, and the small one the quickstart pretrains in phase 0 (a slim
# ResNet-10-T at stride 8: 64 px -> 8 x 8 tokens of 128 channels; a from-scratch SwinV2 of the quickstart's size does
# not learn shapes within its CPU budget, README "The quickstart")
BACKBONE_SIZES: dict[str, BackboneConfig] = {
    "swin_l": BackboneConfig(name=SWIN_L_384, img_size=384),
    "swinv2_b": BackboneConfig(name=SWINV2_B_384, img_size=384),
    "quickstart": BackboneConfig(name="resnet10t", img_size=64,
                                 overrides={"output_stride": 8, "channels": (32, 64, 128, 128), "stem_width": 16}),
    "swinv2_tiny": tiny_swinv2(img_size=64, embed_dim=32, depths=(1, 1), window_size=4),
}


def expansionnet_v2_config(vocab_size: int = 10000, max_seq_len: int = 74, end_to_end: bool = True,
                           **overrides: Any) -> ModelConfig:
    """The baseline as released: 3 + 3 layers, Swin-L, no memory, no gating (loads the official checkpoint)."""
    return model_config("expansionnet_v2", vocab_size=vocab_size, max_seq_len=max_seq_len,
                        backbone=backbone_preset("swin_l") if end_to_end else None, **overrides)


def optimizer_expansionnet_config(vocab_size: int = 10000, max_seq_len: int = 74, end_to_end: bool = True,
                                  **overrides: Any) -> ModelConfig:
    """The seed's model: SwinV2-B (1024 channels), memory-augmented attention (40 slots), gated values, 2 + 2 layers."""
    return model_config("optimizer_expansionnet", vocab_size=vocab_size, max_seq_len=max_seq_len,
                        backbone=backbone_preset("swinv2_b") if end_to_end else None, **overrides)
