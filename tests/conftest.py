"""Shared fixtures: tiny models, vocabularies and checkpoints that every test can build in well under a second."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from data.vocab import Vocabulary, build_vocabulary  # noqa: E402
from models import ModelConfig, build_model, tiny_swinv2  # noqa: E402
from models.config import DROPOUTS  # noqa: E402

TINY_WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "two", "left", "of", "the", "and"]


def tiny_vocab() -> Vocabulary:
    """A vocabulary of a dozen words plus the four specials."""
    return build_vocabulary([" ".join(TINY_WORDS)] * 5, min_count=1)


def tiny_config(name: str = "optimizer_expansionnet", end_to_end: bool = True, vocab_size: int | None = None,
                img_size: int = 32, **overrides) -> ModelConfig:
    """A captioner small enough for CPU tests, with every switch of the named model."""
    seed_model = name == "optimizer_expansionnet"
    backbone = tiny_swinv2(img_size=img_size, embed_dim=16, depths=(1, 1), window_size=4) if end_to_end else None
    cfg = dict(name=name, vocab_size=vocab_size or len(tiny_vocab()), max_seq_len=24, d_model=32,
               N_enc=2 if seed_model else 3, N_dec=2 if seed_model else 3, num_heads=4, ff=64,
               num_exp_enc_list=(4, 8), num_exp_dec=4, img_feature_dim=32 if end_to_end else 24,
               memory_slots=5 if seed_model else 0, mult_residual=seed_model, backbone=backbone,
               **dict.fromkeys(DROPOUTS, 0.0))
    cfg.update(overrides)
    return ModelConfig(**cfg)


@pytest.fixture(scope="session", autouse=True)
def onnx_export_cache(tmp_path_factory):
    """ONNX exports made by backend 'auto' go to a folder of the test session, never to the user's ~/.cache (servers
    started by tests inherit the variable)."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture
def vocab() -> Vocabulary:
    return tiny_vocab()


def save_tiny_checkpoint(path: Path) -> Path:
    """An end-to-end Optimizer-ExpansionNet checkpoint with random weights (seed 0), saved in our format."""
    from deploy.checkpoints import save_model_checkpoint

    torch.manual_seed(0)
    cfg = tiny_config()
    return save_model_checkpoint(path, build_model(cfg), cfg, tiny_vocab())


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "tiny.pth")


@pytest.fixture(scope="module")
def module_checkpoint(tmp_path_factory) -> Path:
    """tiny_checkpoint, saved once for a module (for servers that live as long as the module)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


def make_tiny_dataset(root: Path, num_train: int = 48) -> tuple[Path, Path]:
    """A synthetic dataset at 32 px (num_train / 8 / 8 images) and a from-scratch tiny SwinV2 backbone file."""
    from data.synthetic import SyntheticConfig, generate_synthetic_dataset
    from deploy.checkpoints import save_backbone_file
    from models.backbone import create_backbone

    captions = generate_synthetic_dataset(root / "data", SyntheticConfig(num_train=num_train, num_val=8, num_test=8,
                                                                        image_size=32), progress=False)
    cfg = tiny_swinv2(img_size=32, embed_dim=16, depths=(1, 1), window_size=4)
    torch.manual_seed(0)
    return captions, save_backbone_file(root / "bb.pth", create_backbone(cfg), cfg)
