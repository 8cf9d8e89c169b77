"""From checkpoint files to ready models (ours or the official release) and back, with clear mismatch messages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.vocab import Vocabulary
from models import ModelConfig, build_model, clean_state_dict, official_checkpoint_filter_fn, official_model_config
from models.backbone import infer_backbone_config, load_backbone_state_dict
from models.config import BackboneConfig
from utils.checkpoint import (
    CheckpointError,
    atomic_save,
    is_official,
    load_checkpoint_file,
    load_state_file,
    make_checkpoint,
    state_dict_differences,
    state_dict_sha256,
)

CHECKPOINT_GLOB = "ckpt_e*_it*.pth"  # a run folder's rolling checkpoints; names sort by epoch and iteration


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest rolling checkpoint of a run folder."""
    files = sorted(Path(run_dir).glob(CHECKPOINT_GLOB))
    return files[-1] if files else None


def best_or_last(run_dir: Path) -> Path:
    """The checkpoint a later phase starts from: best.pth (best validation CIDEr-D), else the newest rolling one
    (a run without validation images writes no best.pth); best.pth's path when there is neither yet."""
    best = Path(run_dir) / "best.pth"
    return best if best.exists() else latest_checkpoint(run_dir) or best


@dataclass
class RestoredModel:
    """A model rebuilt from a checkpoint, with the vocabulary and the raw checkpoint dict (training state etc.)."""

    model: nn.Module
    config: ModelConfig
    vocab: Vocabulary
    checkpoint: dict[str, Any]
    path: Path
    official: bool


def unwrap(model: nn.Module) -> nn.Module:
    """The raw module under DDP and torch.compile wrappers (what checkpoints store)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def checkpoint_vocab(ckpt: dict[str, Any], path: Path, vocab_path: str | Path | None) -> Vocabulary:
    """The vocabulary travelling in the checkpoint, or the separate file an official checkpoint needs (--vocab)."""
    if vocab_path is not None:
        vocab = Vocabulary.load(vocab_path)
        if not is_official(ckpt) and ckpt.get("vocab") and Vocabulary.from_dict(ckpt["vocab"]) != vocab:
            raise CheckpointError(f"--vocab {vocab_path} differs from the vocabulary stored in {path}; "
                                  "drop --vocab to use the checkpoint's own")
        return vocab
    if is_official(ckpt):
        raise CheckpointError(f"{path} is an official ExpansionNet v2 checkpoint, which stores no vocabulary: pass "
                              "its vocabulary pickle with --vocab (demo_material/demo_coco_tokens.pickle)")
    return Vocabulary.from_dict(ckpt["vocab"], source=str(path))


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """load_state_dict with a message that lists what differs (missing, unexpected, shapes) instead of a traceback."""
    problems = state_dict_differences(model.state_dict(), state_dict, strict)
    if problems:
        raise CheckpointError(f"weights from {source} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)


def backbone_weights_sha256(checkpoint: dict[str, Any]) -> str | None:
    """The digest of the backbone weights an end-to-end checkpoint holds (what feature files record), or None."""
    state = {k[len("swin_transf."):]: v for k, v in clean_state_dict(checkpoint.get("model_state_dict", {})).items()
             if k.startswith("swin_transf.")}
    return state_dict_sha256(state) if state else None


def require_end_to_end(config: ModelConfig, path: str | Path, purpose: str = "caption images") -> None:
    """A clear error for a features-only model (phases 2 and 5 write them) where images are to be captioned."""
    if config.backbone is None:
        raise CheckpointError(
            f"{path} is a features-only checkpoint (phases 2 and 5 of the recipe write those: they hold no backbone), "
            f"so it cannot {purpose}. Use an end-to-end checkpoint, from phase 3 or 6 (e.g. phase6-scst-e2e/best.pth "
            "or scst-e2e/best.pth), or evaluate this one on cached features with test.py --features_path")


def restore_model(path: str | Path, vocab_path: str | Path | None = None, *, features_only: bool = False,
                  config_override: ModelConfig | None = None, map_location: str | torch.device = "cpu"
                  ) -> RestoredModel:
    """Rebuild the model stored in a checkpoint; features_only drops the backbone (cached-feature phases)."""
    path = Path(path)
    ckpt = load_checkpoint_file(path, map_location=map_location)
    official = is_official(ckpt)
    state = clean_state_dict(ckpt["model_state_dict"])
    try:
        cfg = official_model_config(state) if official else ModelConfig.from_dict(ckpt["model_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read its model config: {e}") from e
    if config_override is not None:
        cfg = config_override
    if features_only:
        cfg = cfg.without_backbone()
        state = {k: v for k, v in state.items() if not k.startswith("swin_transf.")}
    vocab = checkpoint_vocab(ckpt, path, vocab_path)
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(f"vocabulary size mismatch: the vocabulary has {len(vocab)} tokens but the model in "
                              f"{path} has {cfg.vocab_size} outputs (vocab_linear); is this the checkpoint's "
                              "vocabulary?")
    model = build_model(cfg)
    if official:
        state = official_checkpoint_filter_fn(state, model)
    load_weights(model, state, str(path))
    return RestoredModel(model, cfg, vocab, ckpt, path, official)


BACKBONE_FORMAT = "expansionnet-backbone"


def save_backbone_file(path: str | Path, backbone: nn.Module, config: BackboneConfig) -> Path:
    """A backbone's weights with its config (how the quickstart's from-scratch backbone travels to phase 1)."""
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    return atomic_save({"format": BACKBONE_FORMAT, "format_version": 1, "backbone_config": config.to_dict(),
                        "state_dict": state}, path)


def read_backbone_file(path: str | Path, img_size: int | None = None) -> tuple[BackboneConfig, dict[str, torch.Tensor]]:
    """Backbone config and weights from any of: our backbone file, our end-to-end checkpoint, the official
    ExpansionNet v2 checkpoint, or a Microsoft / timm Swin file (SwinV2-B or Swin-L, recognised by shape)."""
    path = Path(path)
    obj = load_state_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"backbone file {path} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == BACKBONE_FORMAT:
        return BackboneConfig.from_dict(obj["backbone_config"]), obj["state_dict"]
    if "model_state_dict" in obj:  # a captioner checkpoint: take its backbone part
        state = {k[len("swin_transf."):]: v for k, v in clean_state_dict(obj["model_state_dict"]).items()
                 if k.startswith("swin_transf.")}
        if not state:
            raise CheckpointError(f"checkpoint {path} has no backbone weights (it is a features-only model); give an "
                                  "end-to-end checkpoint or a Swin file")
        if not is_official(obj) and obj.get("model_config", {}).get("backbone"):
            return BackboneConfig.from_dict(obj["model_config"]["backbone"]), state
    else:
        state = clean_state_dict(obj.get("model", obj.get("state_dict", obj)))
    try:
        cfg = infer_backbone_config(state, img_size=img_size or 384)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return cfg, state


def load_backbone_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Backbone weights (any layout read_backbone_file returns) into an end-to-end model, strictly."""
    backbone = getattr(model, "swin_transf", None)
    if backbone is None:
        raise CheckpointError("the model has no backbone to load weights into (features model)")
    try:
        load_backbone_state_dict(backbone, state, source)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def save_model_checkpoint(path: str | Path, model: nn.Module, config: ModelConfig, vocab: Vocabulary,
                          **extra: Any) -> Path:
    """Atomically save weights + config + vocabulary (+ training state in extra) as one self-contained file."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return atomic_save(make_checkpoint(state, config.to_dict(), vocab.to_dict(), **extra), path)
