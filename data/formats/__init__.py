"""Every kind of captions path in one table (FORMATS), and the readers that dispatch on it.

A path's kind comes from its content, not its name: the first format in FORMATS whose test passes names it (the
order settles overlaps: an 'images' list is Karpathy's before it is a captions JSON). A dataset format is read by
load_records (what the scripts' --captions_path takes), a captions-file format by read_caption_rows (what to-manifest
takes); any other kind is an error that says what the path is and what to give instead. A new format is one module
here with its Format and one line in FORMATS.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from data.formats import captions_json, karpathy, manifest, table, unread
from data.formats.base import Format, Sample
from data.formats.reading import CaptionRow, looks_like_image_name, not_found
from data.records import DatasetError, ImageRecord
from data.report import DataReport

FORMATS: tuple[Format, ...] = (
    karpathy.KARPATHY,  # {"images": [...]}
    karpathy.KARPATHY_FOLDER,  # a folder holding dataset_coco.json (or flickr8k, flickr30k)
    unread.COCO_ANNOTATIONS,  # {"annotations": [...]}
    manifest.MANIFEST,  # JSON lines, or one {"image": ...} object
    captions_json.CAPTIONS_JSON,  # {"file.jpg": [captions]}
    unread.JSON,  # any other JSON
    table.TSV,  # image<TAB>caption
    table.CSV,  # image,caption
    table.TEXT,  # neither on the first line
    unread.EMPTY,
    unread.IMAGE_FOLDER,
    unread.FOLDER,
)
_BY_KIND = {f.kind: f for f in FORMATS}
DATASET_KINDS = frozenset(f.kind for f in FORMATS if f.read_records)
CAPTION_FILE_KINDS = frozenset(f.kind for f in FORMATS if f.read_rows)


def _either(names: list[str]) -> str:
    """'a, b or c'."""
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


# what every script's --captions_path reads (load_records), said once for their --help
CAPTIONS_PATH_HELP = _either([f.listed_as for f in FORMATS if f.read_records and f.listed_as])
_EXPECTED_DATASET = f"expected {CAPTIONS_PATH_HELP}"
_EXPECTED_CAPTIONS = f"--captions_path takes {_either([f.listed_as for f in FORMATS if f.read_rows and f.listed_as])}"


def captions_kind(path: str | os.PathLike[str]) -> str:
    """What a captions path holds, from its content (not its suffix): the kind of a Format in FORMATS, or
    'binary:<description>' for an image or another binary file. A missing path raises, naming a close sibling."""
    path = Path(path)
    if not path.exists():
        raise not_found(path, "captions file")
    sample = Sample.of(path)
    if isinstance(sample, str):
        return sample
    return next(f.kind for f in FORMATS if f.recognises(sample))


def describe_kind(kind: str) -> str:
    """A kind from captions_kind() in words."""
    if kind.startswith("binary:"):
        return kind.split(":", 1)[1]
    return _BY_KIND[kind].description if kind in _BY_KIND else kind


def _misplaced(path: Path, kind: str, explain: Callable[[Path, str], str] | None, expected: str) -> DatasetError:
    """The error for a path a reader cannot read, saying what it is and what to give instead."""
    tail = explain(path, expected) if explain else f", not a captions file; {expected}"
    return DatasetError(f"{path}: this is {describe_kind(kind)}{tail}")


def load_records(
    captions_path: str | os.PathLike[str],
    images_path: str | os.PathLike[str] | None = None,
    report: DataReport | None = None,
) -> list[ImageRecord]:
    """Read a dataset, recognised by its content: a JSON-lines manifest (``images_path`` is looked up first for
    its relative paths), or Karpathy's json or its folder (``images_path`` is the image root). Any other kind of
    file (a captions CSV, an image, ...) is an error that says what the file is and what to give instead."""
    path = Path(captions_path)
    kind = captions_kind(path)
    found = _BY_KIND.get(kind)
    reader = found.read_records if found else None
    if kind in (unread.JSON.kind, captions_json.CAPTIONS_JSON.kind) and \
            path.suffix.lower() in manifest.MANIFEST_SUFFIXES:
        reader = manifest.load_manifest  # one object, named as a manifest: its reader explains
    elif kind == unread.JSON.kind:
        reader = karpathy.load_karpathy_json  # a JSON document not recognised from its start: Karpathy's explains
    if reader is None:
        raise _misplaced(path, kind, found.as_dataset if found else None, _EXPECTED_DATASET)
    return reader(path, images_path, report)


def read_caption_rows(
    captions_file: str | os.PathLike[str], is_image: Callable[[str], bool] | None = None
) -> tuple[list[CaptionRow], str]:
    """The rows of a captions file and its form in words ('CSV with a header', ...).

    ``is_image`` tells whether a table's first cell is an image name (default: a known image suffix): a first row
    whose first cell is not one is a header. Another kind of file (a manifest, an image, ...) is an error saying what
    it is."""
    path = Path(captions_file)
    kind = captions_kind(path)
    found = _BY_KIND.get(kind)
    reader = found.read_rows if found else None
    if kind == unread.JSON.kind:
        reader = captions_json.read_captions_json  # a JSON document too long to recognise from its start
    if reader is None:
        raise _misplaced(path, kind, found.as_captions if found else None, _EXPECTED_CAPTIONS)
    return reader(path, is_image or looks_like_image_name)
