"""Device and precision, shared by every script: the runtime flags, and one autocast context built from a string."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import random
from dataclasses import dataclass

import numpy as np
import torch

from utils.fields import option

PRECISIONS = ("fp32", "bf16", "fp16")


def precision_name(value: str) -> str:
    """A precision flag value (auto, fp32, bf16, fp16); 'none', the --amp spelling of fp32, is accepted."""
    value = value.lower()
    if value == "none":
        return "fp32"
    if value not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {value!r}")
    return value


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how a script computes; every script's config inherits these, so the flags mean the same in each."""

    device: str = option("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N", group="runtime")
    precision: str = option("auto", "autocast precision: auto (bf16 on a GPU that supports it, fp32 on the CPU), "
                            "fp32, bf16 or fp16; --amp is an alias (--amp none = fp32)", aliases=("--amp",),
                            parse=precision_name, group="runtime")
    num_workers: int = option(2, "image-decoding worker processes", group="runtime")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' (a GPU when there is one), 'cpu', 'cuda', 'cuda:1' or None (cpu); a clear error when CUDA is asked for
    but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available on this machine; use --device cpu")
    return device


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """'auto' means bf16 on a CUDA GPU that supports it and fp32 on the CPU."""
    if precision in (None, "auto", "none"):
        if precision == "none":
            return "fp32"
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS + ('auto',)}")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The one autocast context of a run: a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (mmap threshold 32 MiB, trim threshold 1 GiB) instead of
    handing it back to the kernel, which makes the next tensor of that size fault its pages in again: 85,000 page
    faults per CPU beam search of 8 images, 15-20% of its time (docs/benchmarks.md, "Decoding"). PyTorch's tuning
    guide gets the same from jemalloc or tcmalloc. Process-wide, so called by the entry points that caption or train
    on the CPU; once per process. Returns whether it applied (False without glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
