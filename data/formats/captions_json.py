"""A captions JSON: ``{"file.jpg": ["caption", ...]}`` (a single caption may be a string), one of to-manifest's
captions files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from data.formats.base import Format, Sample, make_a_manifest
from data.formats.reading import CaptionRow, parse_json, read_utf8
from data.records import DatasetError


def read_captions_json(path: Path, is_image: Callable[[str], bool] | None = None) -> tuple[list[CaptionRow], str]:
    """The rows of a captions JSON, one per caption (an image with none gets one empty row); ``is_image`` is not
    needed: a JSON entry names its image."""
    data = parse_json(read_utf8(path, "captions file"), str(path))
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object mapping image file names to lists of captions")
    rows: list[CaptionRow] = []
    for name, captions in data.items():
        where = f"entry {name!r}"
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list):
            raise DatasetError(f"{path}: {where}: captions must be a list of strings, got {type(captions).__name__}")
        for position, caption in enumerate(captions):
            if not isinstance(caption, str):
                kind = type(caption).__name__
                raise DatasetError(f"{path}: {where}: caption {position} is {kind}, expected a string")
        rows += [CaptionRow(where, name, caption) for caption in captions] or [CaptionRow(where, name, "")]
    return rows, "JSON {image: [captions]}"


def _maps_names_to_captions(sample: Sample) -> bool:
    document = sample.document
    return isinstance(document, dict) and bool(document) and all(isinstance(v, (str, list)) for v in document.values())


CAPTIONS_JSON = Format(
    kind="captions-json", description="a captions JSON ({\"file.jpg\": [captions]})",
    recognises=_maps_names_to_captions, read_rows=read_captions_json,
    listed_as="a JSON {\"file.jpg\": [captions]}", as_dataset=make_a_manifest)
