"""Checkpoint files: one self-contained, versioned dict saved atomically and loaded as data (weights_only=True)."""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "expansionnet-captioning-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save into a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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


def file_sha256(path: str | Path, limit_bytes: int | None = None) -> str:
    """Hex digest of a file (the first limit_bytes only when given), to identify checkpoints in results."""
    h = hashlib.sha256()
    remaining = limit_bytes
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Digest of tensor contents in key order (identifies weights independently of the file around them)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        t = state_dict[k].detach().cpu().contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
