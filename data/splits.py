"""Train / val / test: the split names, grouping records by split, and seeded random splits in given proportions."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from data.records import DatasetError, ImageRecord

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Karpathy's "restval" images are training images (the reference trains on train + restval).
_SPLIT_ALIASES: dict[str, str] = {"train": "train", "restval": "train", "val": "val", "test": "test"}
DEFAULT_SPLIT_RATIO: tuple[float, float, float] = (0.9, 0.05, 0.05)


def normalise_split(value: Any, where: str) -> str:
    """Map a split name to train/val/test (restval -> train) or raise naming the field."""
    if not isinstance(value, str) or value not in _SPLIT_ALIASES:
        allowed = ", ".join(_SPLIT_ALIASES)
        raise DatasetError(f"{where}: field 'split' has unknown value {value!r} (expected one of {allowed})")
    return _SPLIT_ALIASES[value]


def split_records(records: Iterable[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """Group records by split ("train", "val", "test" always present), keeping the input order."""
    groups: dict[str, list[ImageRecord]] = {split: [] for split in SPLITS}
    for record in records:
        if record.split not in groups:
            raise DatasetError(f"image {record.image_id} ({record.path}): unknown split {record.split!r}")
        groups[record.split].append(record)
    return groups


def parse_split_ratio(value: str | Sequence[float]) -> tuple[float, float, float]:
    """Parse "0.9,0.05,0.05" (train, val, test); the parts must be non-negative and sum to 1."""
    parts: list[float]
    try:
        parts = [float(part) for part in value.split(",")] if isinstance(value, str) else [float(v) for v in value]
    except ValueError:
        raise DatasetError(f"split ratio {value!r}: expected three numbers like 0.9,0.05,0.05") from None
    if len(parts) != 3 or any(part < 0 for part in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise DatasetError(f"split ratio {value!r}: expected three non-negative numbers summing to 1 (train,val,test)")
    return parts[0], parts[1], parts[2]


def split_sizes(count: int, ratio: tuple[float, float, float]) -> tuple[int, int, int]:
    """Images per split: val and test rounded, train the rest; a split with a positive share gets at least one
    image while train keeps one (val before test)."""
    train_share, val_share, test_share = ratio
    n_val = min(round(count * val_share), count)
    n_test = min(round(count * test_share), count - n_val)
    reserve = 1 if train_share > 0 else 0
    if val_share > 0 and n_val == 0 and count - n_test > reserve:  # val first: it decides which best.pth is kept
        n_val = 1
    if test_share > 0 and n_test == 0 and count - n_val > reserve:
        n_test = 1
    n_train = count - n_val - n_test if train_share > 0 else 0
    return n_train, n_val, count - n_train - n_val


def assign_splits(count: int, ratio: tuple[float, float, float], seed: int) -> list[str]:
    """Deterministically assign train/val/test to ``count`` items in the given proportions (see split_sizes)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_train, n_val, _ = split_sizes(count, ratio)
    splits = ["test"] * count
    for rank, index in enumerate(order):
        if rank < n_train:
            splits[index] = "train"
        elif rank < n_train + n_val:
            splits[index] = "val"
    return splits
