"""JSON-lines manifests, our dataset format: one ``{"image", "captions", "split", "image_id"?}`` object per line.

Where a manifest's images are: an absolute path is used as it is. A relative path is looked up under the images
folder (``--images_path``) when one is given and the file is there, otherwise beside the manifest (in the manifest's
folder). So a manifest that to-manifest wrote works with or without ``--images_path``, and ``--images_path`` can point
at a copy of the images elsewhere; a missing image's message names both places tried.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from data.formats.base import Format, Sample
from data.formats.reading import Collector, as_int_id, parse_json, read_utf8
from data.records import DatasetError, ImageRecord
from data.report import DataReport
from data.splits import SPLITS, normalise_split

MANIFEST_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")


def resolve_manifest_image(
    image: str, manifest_dir: Path, images_path: str | os.PathLike[str] | None = None
) -> tuple[Path, tuple[Path, ...]]:
    """Where a manifest's image is: (path, places tried).

    An absolute path is used as it is. A relative one is looked up under ``images_path`` when given and the file
    is there, otherwise beside the manifest (``manifest_dir``); when neither exists the path is the first place.
    """
    relative = Path(image)
    if relative.is_absolute():
        return relative, ()
    beside = manifest_dir / relative
    if images_path in (None, ""):
        return beside, ()
    under = Path(images_path) / relative
    if os.path.abspath(under) == os.path.abspath(beside):
        return under, ()
    for candidate in (under, beside):
        if candidate.is_file():
            return candidate, (under, beside)
    return under, (under, beside)


def _manifest_item(line: str, where: str) -> tuple[str, list[Any], str, Any]:
    """(image, captions, split, image_id or None) of one manifest line, or raise naming the field."""
    item = parse_json(line, where)
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(item).__name__}")
    image = item.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(f"{where}: field 'image' is missing or not a non-empty string")
    if "captions" not in item:
        raise DatasetError(f"{where}: field 'captions' is missing")
    if not isinstance(item["captions"], list):
        raise DatasetError(f"{where}: field 'captions' must be a list of strings")
    if "split" not in item:
        raise DatasetError(f"{where}: field 'split' is missing (one of {', '.join(SPLITS)})")
    return image, item["captions"], normalise_split(item["split"], where), item.get("image_id")


def load_manifest(
    path: str | os.PathLike[str],
    images_path: str | os.PathLike[str] | None = None,
    report: DataReport | None = None,
) -> list[ImageRecord]:
    """Read a JSON-lines manifest: one ``{"image", "captions", "split", "image_id"?}`` object per line.

    A relative image path is looked up under ``images_path`` when given and the file is there, otherwise beside
    the manifest (see :func:`resolve_manifest_image`). ``image_id`` defaults to the record's 0-based position among
    the non-blank lines. Blank lines are ignored. With a ``report`` (a validation pass) images without captions are
    reported and skipped, and empty or duplicate captions are reported instead of warned about.
    """
    manifest = Path(path)
    text = read_utf8(manifest, "manifest")
    collect = Collector(manifest, report)
    records: list[ImageRecord] = []
    seen: dict[int, int] = {}
    position = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{manifest}: line {lineno}"
        image, raw_captions, split, raw_id = _manifest_item(line, where)
        image_id = position if raw_id is None else as_int_id(raw_id, where, "image_id")
        position += 1
        if image_id in seen:
            raise DatasetError(f"{where}: field 'image_id' {image_id} duplicates line {seen[image_id]}")
        seen[image_id] = lineno
        label = f"line {lineno} ({image})"
        captions = collect.captions(raw_captions, where, "captions", label)
        if captions is None:
            continue
        image_path, tried = resolve_manifest_image(image, manifest.parent, images_path)
        collect.image(image_path, label)
        records.append(ImageRecord(image_id, image_path, captions, split, tried))
    collect.finish()
    return records


def _is_manifest(sample: Sample) -> bool:
    """JSON lines, or a manifest of one line."""
    return sample.json_lines or (isinstance(sample.document, dict) and "image" in sample.document)


def _already_a_manifest(path: Path, expected: str) -> str:
    return (", already what to-manifest writes: pass it as --captions_path to the scripts; check it with python -m "
            f"data.captions check --captions_path {path}")


MANIFEST = Format(
    kind="manifest", description="a JSON-lines manifest (one image per line)", recognises=_is_manifest,
    read_records=load_manifest, listed_as="a JSON-lines manifest (.jsonl)", as_captions=_already_a_manifest)

