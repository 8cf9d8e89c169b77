"""What every dataset reader returns: one ImageRecord per image, and the one error type for bad dataset input."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Image files by suffix; data.images lists folders with this set too (this module stays light: no torch).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class DatasetError(ValueError):
    """Malformed dataset input; the message names the file, the line or item and the field."""


@dataclass(frozen=True)
class ImageRecord:
    """One image with its reference captions and its split ("train", "val" or "test").

    ``tried`` holds the places a manifest's relative path was looked up (under the images folder, then beside the
    manifest) when there were two; ``path`` is the first that exists, or the first one when neither does.
    """

    image_id: int
    path: Path
    captions: tuple[str, ...]
    split: str
    tried: tuple[Path, ...] = field(default=(), compare=False, repr=False)


def missing_image_message(record: ImageRecord) -> str:
    """'<path>: image file not found', naming every place a relative manifest path was looked up."""
    if len(record.tried) > 1:
        places = " and ".join(str(p) for p in record.tried)
        return f"{record.path}: image file not found (looked under the images folder and beside the manifest: {places})"
    return f"{record.path}: image file not found"


def check_images_exist(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Return the records whose image file is missing (loaders skip them at read time with a warning)."""
    return [record for record in records if not record.path.is_file()]
