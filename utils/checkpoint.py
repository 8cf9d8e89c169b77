"""Checkpoint files: one self-contained, versioned dict saved atomically and loaded as data (weights_only=True)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from utils.files import atomic_write

FORMAT = "expansionnet-captioning-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically: a crash never leaves half a checkpoint."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def make_checkpoint(model_state: dict[str, torch.Tensor], model_config: dict[str, Any], vocab: dict[str, Any],
                    **extra: Any) -> dict[str, Any]:
    """Our checkpoint layout: weights, model config, vocabulary, and optional training state (plain data only)."""
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": model_config, "vocab": vocab,
            "model_state_dict": model_state}
    ckpt.update(extra)
    return ckpt


def load_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint as data. Our own format and the official ExpansionNet v2 release are both accepted."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else
                              f"checkpoint {path} is not a file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} holds Python objects beyond tensors and plain data, so it is not "
                              f"loaded (a checkpoint is data, never code): {str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch file (truncated or another format?): "
                              f"{str(e).splitlines()[0]}") from e
    if not isinstance(obj, dict) or "model_state_dict" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"checkpoint {path} has no 'model_state_dict' (found {keys}); is it a backbone file? "
                              "Backbone weights go to --backbone_save_path / --save_model_path of data_generator.py")
    if obj.get("format") == FORMAT and obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {obj['format_version']}, newer than this code "
                              f"({FORMAT_VERSION}); update the code")
    return obj


def is_official(ckpt: dict[str, Any]) -> bool:
    """True for the official ExpansionNet v2 files (no config, no vocabulary inside)."""
    return ckpt.get("format") != FORMAT


def load_state_file(path: str | Path) -> dict[str, Any]:
    """Any torch file of tensors (a backbone's weights) as data, with the same clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"weights file {path} holds Python objects beyond tensors and plain data, so it is not "
                              f"loaded: {str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"weights file {path} is not a readable PyTorch file: {str(e).splitlines()[0]}") from e


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Digest of tensor contents in key order (identifies weights independently of the file around them)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        t = state_dict[k].detach().cpu().contiguous().reshape(-1)  # 0-d buffers (BatchNorm's counters) too
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_dict_differences(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor],
                           strict: bool = True) -> list[str]:
    """What keeps `given` from loading into a model whose state dict is `expected`: shape mismatches, and when
    strict, missing and unexpected keys; each part counted, with a few examples. Empty when it fits."""
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in given.items() if k in expected and v.shape != expected[k].shape]
    missing = sorted(set(expected) - set(given)) if strict else []
    unexpected = sorted(set(given) - set(expected)) if strict else []
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}")
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[:4]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
    return parts
