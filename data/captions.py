"""Caption datasets: Karpathy json and JSON-lines manifest readers, captions file -> manifest, one validation pass.

Command line::

    python -m data.captions to-manifest --images photos/ --captions captions.csv --output manifest.jsonl \\
        [--split-ratio 0.9,0.05,0.05 --seed 0 | --split train] [--skip-missing] [--overwrite]
    python -m data.captions check --captions manifest.jsonl [--images photos/]

Captions files: CSV ``image,caption`` and TSV ``image<TAB>caption``, each with or without a header (a first row whose
first cell is not an image file name is a header, and must name the columns ``image`` and ``caption``; other columns
are ignored), or JSON ``{"file.jpg": ["caption", ...]}``. Image names are relative to ``--images``.

Both commands print one summary: the counts per split and every problem with what it means for training (images
missing from the folder, images without captions, empty and duplicate captions, empty splits). ``to-manifest``
writes nothing while captions name missing images unless ``--skip-missing`` leaves those rows out; with neither
``--split`` nor ``--split-ratio`` it splits the images at random 0.9,0.05,0.05 (``--seed``, default 0) and says so.
``check`` reads a manifest, a Karpathy json or its folder, or a captions file with ``--images`` (what to-manifest
would write, without writing); it exits 1 when image files are missing or an image has no caption. Errors are one
line ``error: ...`` with exit status 2.

Where a manifest's images are: an absolute path is used as it is. A relative path is looked up under the images
folder (``--images_path`` of the scripts, ``--images`` of check) when one is given and the file is there, otherwise
beside the manifest (in the manifest's folder). So a manifest that to-manifest wrote works with or without
``--images_path``, and ``--images_path`` can point at a copy of the images elsewhere; a missing image's message
names both places tried. Karpathy's json: ``images_path/filepath/filename`` (default: the json's folder).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.cli import ArgumentParser, plain_warnings
from utils.files import atomic_write_text

# what every script's --captions_path reads (load_records), said once for their --help
CAPTIONS_PATH_HELP = "Karpathy json (or its folder) or a JSON-lines manifest"
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Karpathy's "restval" images are training images (the reference trains on train + restval).
_SPLIT_ALIASES: dict[str, str] = {"train": "train", "restval": "train", "val": "val", "test": "test"}
KARPATHY_FILENAMES: tuple[str, ...] = ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json")
MANIFEST_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")
DEFAULT_SPLIT_RATIO: tuple[float, float, float] = (0.9, 0.05, 0.05)
# Image files by suffix; data.images lists folders with this set too (this module stays light: no torch).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_UTF8_BOM = b"\xef\xbb\xbf"
_FLICKR_CAPTION_SUFFIX = re.compile(r"#\d+$")
_MAX_LISTED = 10
_SNIFF_BYTES = 1 << 16
_TO_MANIFEST = "python -m data.captions to-manifest --images IMAGES_FOLDER --captions {path} --output manifest.jsonl"


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


def plural(count: int, singular: str, many: str | None = None) -> str:
    """"3 images", "1 image": a count with its noun."""
    return f"{count} {singular if count == 1 else (many or singular + 's')}"


def _listed(items: Sequence[str]) -> str:
    """The first few items, comma-separated, with 'and N more'."""
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


# ----------------------------------------------------------------------------------------------------------------
# The validation summary


# kind: (title for one, title for several, what it means for training, whether it stops training or loses images)
_PROBLEMS: dict[str, tuple[str, str, str, bool]] = {
    "missing_row": (
        "caption row names an image not in {images}", "caption rows name images not in {images}",
        "nothing is written: correct the names, or pass --skip-missing to leave these rows out", True),
    "missing_row_skipped": (
        "caption row names an image not in {images}", "caption rows name images not in {images}",
        "left out of the manifest (--skip-missing)", False),
    "missing_file": (
        "image file is missing", "image files are missing",
        "training skips them, and data_generator.py stops when more than --max_unreadable (default 0.05) of the "
        "images are missing; check --images / --images_path", True),
    "unlisted_image": (
        "image in {images} has no caption row", "images in {images} have no caption row",
        "not in the manifest, so training never sees them; add caption rows to use them", False),
    "only_empty": (
        "image has only empty captions", "images have only empty captions",
        "left out of the manifest: an image needs at least one caption", False),
    "no_caption": (
        "image has no caption", "images have no caption",
        "train.py, test.py and data_generator.py refuse this file until each is captioned or removed", True),
    "empty_caption": (
        "empty caption", "empty captions",
        "dropped when read: an empty caption teaches nothing (the image keeps its other captions)", False),
    "duplicate_dropped": (
        "duplicate caption (same image, same text)", "duplicate captions (same image, same text)",
        "dropped: a repeated caption would count twice in training and in the evaluation references", False),
    "duplicate_kept": (
        "duplicate caption (same image, same text)", "duplicate captions (same image, same text)",
        "kept by the readers: each counts twice in training and in the evaluation references (to-manifest drops "
        "duplicates)", False),
    "duplicate_image": (
        "image is listed more than once", "images are listed more than once",
        "each copy is trained on as a separate image, and copies in two splits leak into the evaluation", False),
    "no_train": ("no train images", "no train images", "train.py has nothing to train on", False),
    "no_val": (
        "no val images", "no val images",
        "training keeps no best.pth: later phases use the last checkpoint; assign a val split with to-manifest "
        "--split-ratio 0.9,0.05,0.05", False),
    "no_test": (
        "no test images", "no test images",
        "test.py has nothing to score (test.py --split val scores the val images); assign a test split with "
        "to-manifest --split-ratio 0.9,0.05,0.05", False),
}
_SPLIT_PROBLEMS = {"train": "no_train", "val": "no_val", "test": "no_test"}


@dataclass
class DataReport:
    """One validation pass: what was read, facts (counts, splits, where images were found) and problems, each with
    the places it occurs and what it means for training."""

    header: str
    facts: list[str] = field(default_factory=list)
    found: dict[str, list[str]] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, place: str = "") -> None:
        """Record one occurrence of a problem kind (a key of _PROBLEMS) at a place ('' for split problems)."""
        self.found.setdefault(kind, []).append(place)

    def add_split_counts(self, counts: dict[str, int], how: str = "") -> None:
        """The 'splits:' fact line and a problem for each empty split."""
        listed = ", ".join(f"{name} {counts.get(name, 0)}" for name in SPLITS)
        self.facts.append(f"splits: {how}{listed}")
        for name in SPLITS:
            if not counts.get(name):
                self.add(_SPLIT_PROBLEMS[name])

    @property
    def severe(self) -> list[str]:
        """The problem kinds that stop training or lose images."""
        return [kind for kind in self.found if _PROBLEMS[kind][3]]

    def title(self, kind: str) -> str:
        """'2 caption rows name images not in photos/' (split problems have no count)."""
        one, several, _, _ = _PROBLEMS[kind]
        places = self.found.get(kind, [])
        if kind in _SPLIT_PROBLEMS.values():
            return one
        return f"{len(places)} {(one if len(places) == 1 else several).format(**self.context)}"

    def problem_lines(self) -> list[str]:
        lines = []
        for kind in sorted(self.found, key=list(_PROBLEMS).index):
            places = self.found[kind]
            examples = [p for p in places if p]
            lines.append(f"  - {self.title(kind)}" + (f": {_listed(examples)}" if examples else ""))
            lines.append(f"      {_PROBLEMS[kind][2]}")
        return lines

    def lines(self) -> list[str]:
        """The summary, one problem per entry followed by what it means for training."""
        head = [self.header, *self.facts]
        if not self.found:
            return [*head, "no problems found"]
        return [*head, f"{plural(len(self.found), 'problem')}:", *self.problem_lines()]

    def text(self) -> str:
        return "\n".join(self.lines())


# ----------------------------------------------------------------------------------------------------------------
# What kind of file a path is


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x89HDF", "an HDF5 file (a feature file?)"),
    (b"PK\x03\x04", "a zip archive (a PyTorch checkpoint is one)"),
)
KIND_DESCRIPTIONS: dict[str, str] = {
    "manifest": "a JSON-lines manifest (one image per line)",
    "karpathy": "Karpathy's dataset json (an 'images' list)",
    "karpathy-folder": "a folder holding Karpathy's dataset json",
    "coco-annotations": "COCO's caption annotations (an 'annotations' list, as in captions_train2014.json)",
    "captions-json": "a captions JSON ({\"file.jpg\": [captions]})",
    "json": "a JSON document",
    "csv": "a captions CSV (image,caption)",
    "tsv": "a captions TSV (image<TAB>caption)",
    "text": "a text file with neither a comma nor a tab on its first line",
    "empty": "an empty file",
    "image-folder": "a folder of images",
    "folder": "a folder",
}
CAPTION_FILE_KINDS = frozenset({"csv", "tsv", "captions-json", "text"})


def _not_found(path: Path, what: str) -> DatasetError:
    """'<path>: <what> not found', with the closest name in the same folder when there is one."""
    folder = path.parent
    if not folder.is_dir():
        return DatasetError(f"{path}: {what} not found (the folder {folder} does not exist)")
    names = [entry.name for entry in folder.iterdir()]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    hint = f" (did you mean {folder / close[0]}?)" if close else ""
    return DatasetError(f"{path}: {what} not found{hint}")


def _json_kind(data: Any) -> str:
    """The kind of a parsed JSON document."""
    if isinstance(data, dict):
        if "images" in data:
            return "karpathy"
        if "annotations" in data:
            return "coco-annotations"
        if "image" in data:
            return "manifest"  # a manifest of one line
        if data and all(isinstance(v, (str, list)) for v in data.values()):
            return "captions-json"
    return "json"


def _json_text_kind(text: str, complete: bool) -> str:
    """The kind of a file starting with '{' or '[': JSON lines, or one JSON document."""
    first, _, rest = text.partition("\n")
    try:
        head = json.loads(first)
    except json.JSONDecodeError:
        head = None
    if head is not None and rest.strip():
        return "manifest"  # a whole object on line 1 and more lines: JSON lines
    if complete:
        try:
            return _json_kind(json.loads(text))
        except json.JSONDecodeError:
            return "json"
    if re.search(r'"images"\s*:\s*\[', text):
        return "karpathy"
    return "coco-annotations" if re.search(r'"annotations"\s*:\s*\[', text) else "json"


def _folder_kind(path: Path) -> str:
    if any((path / name).is_file() for name in KARPATHY_FILENAMES):
        return "karpathy-folder"
    if any(entry.suffix.lower() in IMAGE_SUFFIXES for entry in path.iterdir()):
        return "image-folder"
    return "folder"


def captions_kind(path: str | os.PathLike[str]) -> str:
    """What a captions path holds, from its content (not its suffix): a key of KIND_DESCRIPTIONS, or
    'binary:<description>' for an image or another binary file. A missing path raises, naming a close sibling."""
    path = Path(path)
    if path.is_dir():
        return _folder_kind(path)
    if not path.exists():
        raise _not_found(path, "captions file")
    with open(path, "rb") as handle:
        raw = handle.read(_SNIFF_BYTES + 1)
    complete = len(raw) <= _SNIFF_BYTES
    raw = raw[len(_UTF8_BOM):] if raw.startswith(_UTF8_BOM) else raw
    for magic, description in _MAGIC:
        if raw.startswith(magic):
            return f"binary:{description}"
    if raw.startswith(b"RIFF") and raw[8:12] == b"WEBP":
        return "binary:a WebP image"
    if b"\x00" in raw:
        return "binary:a binary file"
    text = raw[:_SNIFF_BYTES].decode("utf-8", errors="replace").lstrip()
    if not text.strip():
        return "empty"
    if text[0] in "{[":
        return _json_text_kind(text, complete)
    first_line = text.split("\n", 1)[0]
    return "tsv" if "\t" in first_line else "csv" if "," in first_line else "text"


def describe_kind(kind: str) -> str:
    """A kind from captions_kind() in words."""
    return kind.split(":", 1)[1] if kind.startswith("binary:") else KIND_DESCRIPTIONS.get(kind, kind)


def _not_a_dataset(path: Path, kind: str) -> DatasetError:
    """The error for a file the dataset readers cannot read, saying what it is and what to give instead."""
    what = f"{path}: this is {describe_kind(kind)}"
    expected = "expected a JSON-lines manifest (.jsonl), Karpathy's dataset json or its folder"
    if kind in CAPTION_FILE_KINDS:
        return DatasetError(f"{what}, not a dataset; make a manifest from it: {_TO_MANIFEST.format(path=path)}")
    if kind == "coco-annotations":
        return DatasetError(f"{what}, which is not read here; use Karpathy's dataset_coco.json (the same captions "
                            "with train/val/test splits)")
    if kind == "image-folder":
        return DatasetError(f"{what}, not a captions file ({expected}); to caption your own images, make a "
                            f"manifest: {_TO_MANIFEST.format(path='captions.csv').replace('IMAGES_FOLDER', str(path))}")
    if kind == "folder":
        manifests = sorted(p.name for p in path.iterdir() if p.suffix.lower() in MANIFEST_SUFFIXES)
        hint = f" (it holds {', '.join(manifests[:3])}: pass that file)" if manifests else ""
        return DatasetError(f"{what} without {' or '.join(KARPATHY_FILENAMES)}; {expected}{hint}")
    return DatasetError(f"{what}, not a captions file; {expected}")


# ----------------------------------------------------------------------------------------------------------------
# Dataset readers


def _read_utf8(path: Path, what: str) -> str:
    """Read a whole text file as strict UTF-8 (a leading BOM is allowed); errors name the file and byte offset."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found" if not path.exists() else f"{path}: {what} is not a file")
    raw = path.read_bytes()
    skip = len(_UTF8_BOM) if raw.startswith(_UTF8_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skip
        line = raw.count(b"\n", 0, offset) + 1
        raise DatasetError(
            f"{path}: not valid UTF-8 at byte offset {offset} (line {line}): {raw[offset : offset + 4]!r}; "
            "save the file as UTF-8"
        ) from None


def _normalise_split(value: Any, where: str) -> str:
    """Map a split name to train/val/test (restval -> train) or raise naming the field."""
    if not isinstance(value, str) or value not in _SPLIT_ALIASES:
        allowed = ", ".join(_SPLIT_ALIASES)
        raise DatasetError(f"{where}: field 'split' has unknown value {value!r} (expected one of {allowed})")
    return _SPLIT_ALIASES[value]


def _clean_captions(
    captions: Sequence[Any], where: str, field_name: str, lenient: bool = False
) -> tuple[tuple[str, ...], int]:
    """Check the captions are strings and drop empty/whitespace ones; return (kept, dropped).

    With none left this raises, unless ``lenient`` (a validation pass), which returns an empty tuple."""
    kept: list[str] = []
    for position, caption in enumerate(captions):
        if not isinstance(caption, str):
            kind = type(caption).__name__
            raise DatasetError(f"{where}: field {field_name}[{position}] is {kind}, expected a string")
        if caption.strip():
            kept.append(caption)
    if not kept and not lenient:
        detail = "is empty" if not captions else "holds only empty or whitespace captions"
        raise DatasetError(f"{where}: field {field_name!r} {detail}; every image needs at least one caption")
    return tuple(kept), len(captions) - len(kept)


def _caption_key(caption: str) -> str:
    """Captions that tokenise the same (case and spacing aside) are duplicates."""
    return " ".join(caption.split()).lower()


class _Collector:
    """Per-record bookkeeping of one read: dropped empty captions, and in a validation pass (with a report)
    images without captions, duplicate captions and images listed twice."""

    def __init__(self, source: Path, report: DataReport | None) -> None:
        self.source, self.report = source, report
        self.dropped: list[tuple[str, int]] = []
        self.paths: dict[Path, str] = {}

    def captions(self, raw: Sequence[Any], where: str, field_name: str, label: str) -> tuple[str, ...] | None:
        """The kept captions of one record; None when a validation pass skips an image without captions."""
        captions, n_dropped = _clean_captions(raw, where, field_name, lenient=self.report is not None)
        if not captions and self.report is not None:
            self.report.add("no_caption", label)
            return None
        if n_dropped:
            self.dropped.append((label, n_dropped))
        if self.report is None:
            return captions
        keys = [_caption_key(c) for c in captions]
        for position, key in enumerate(keys):
            if key in keys[:position]:
                self.report.add("duplicate_kept", f"{label} {captions[position]!r}")
        return captions

    def image(self, path: Path, label: str) -> None:
        if self.report is None:
            return
        key = Path(os.path.abspath(path))
        if key in self.paths:
            self.report.add("duplicate_image", f"{label}, also at {self.paths[key]}")
        self.paths.setdefault(key, label.split(" (")[0])

    def finish(self) -> None:
        """Report the dropped empty captions: in the report, or as one warning for the file."""
        if not self.dropped:
            return
        if self.report is not None:
            for label, count in self.dropped:
                self.report.add("empty_caption", label + (f" x{count}" if count > 1 else ""))
            return
        total = sum(count for _, count in self.dropped)
        listed = _listed([label + (f" x{count}" if count > 1 else "") for label, count in self.dropped])
        warnings.warn(f"{self.source}: dropped {total} empty caption(s) at {listed}", UserWarning, stacklevel=4)


def _as_int_id(value: Any, where: str, field_name: str) -> int:
    """Accept a JSON integer id (not a bool, not a float) or raise naming the field."""
    if type(value) is not int:
        raise DatasetError(f"{where}: field {field_name!r} must be an integer, got {value!r}")
    return value


def resolve_karpathy_file(captions_path: str | os.PathLike[str]) -> Path:
    """Return the Karpathy json: the path itself, or the single dataset_*.json inside a folder."""
    path = Path(captions_path)
    if not path.is_dir():
        return path
    found = [path / name for name in KARPATHY_FILENAMES if (path / name).is_file()]
    if len(found) != 1:
        names = ", ".join(KARPATHY_FILENAMES)
        detail = "none" if not found else ", ".join(p.name for p in found)
        raise DatasetError(f"{path}: expected exactly one of {names} in this folder, found {detail}")
    return found[0]


def _karpathy_id(item: dict[str, Any], where: str) -> int:
    if "cocoid" in item:
        return _as_int_id(item["cocoid"], where, "cocoid")
    if "imgid" in item:
        return _as_int_id(item["imgid"], where, "imgid")
    raise DatasetError(f"{where}: field 'cocoid' (or 'imgid') is missing")


def _karpathy_record(item: Any, where: str, base: Path, collect: _Collector) -> ImageRecord | None:
    """One item of Karpathy's 'images' list (None: skipped by a validation pass)."""
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: expected an object, got {type(item).__name__}")
    filename = item.get("filename")
    if not isinstance(filename, str) or not filename:
        raise DatasetError(f"{where}: field 'filename' is missing or not a non-empty string")
    filepath = item.get("filepath", "")
    if not isinstance(filepath, str):
        raise DatasetError(f"{where}: field 'filepath' must be a string, got {filepath!r}")
    image_id = _karpathy_id(item, where)
    if "split" not in item:
        raise DatasetError(f"{where}: field 'split' is missing")
    split = _normalise_split(item["split"], where)
    sentences = item.get("sentences")
    if not isinstance(sentences, list):
        raise DatasetError(f"{where}: field 'sentences' is missing or not a list")
    raws: list[Any] = []
    for position, sentence in enumerate(sentences):
        if not isinstance(sentence, dict) or "raw" not in sentence:
            raise DatasetError(f"{where}: field 'sentences[{position}].raw' is missing")
        raws.append(sentence["raw"])
    label = f"{where.rsplit(': ', 1)[-1]} ({filename})"
    captions = collect.captions(raws, where, "sentences[*].raw", label)
    if captions is None:
        return None
    path = base / filepath / filename
    collect.image(path, label)
    return ImageRecord(image_id, path, captions, split)


def _describe_json(data: Any) -> str:
    kind = _json_kind(data)
    if kind == "json":
        return f"a JSON {type(data).__name__}" if not isinstance(data, dict) else "a JSON object without 'images'"
    return describe_kind(kind)


def load_karpathy_json(
    captions_path: str | os.PathLike[str],
    images_path: str | os.PathLike[str] | None = None,
    report: DataReport | None = None,
) -> list[ImageRecord]:
    """Read Karpathy's dataset_{coco,flickr8k,flickr30k}.json (a file, or a folder holding exactly one).

    The image path is ``images_path / filepath / filename`` (``filepath`` is absent for Flickr); ``images_path``
    defaults to the json's folder. The id is ``cocoid``, or ``imgid`` when there is no cocoid. "restval" becomes
    "train". Records keep the file order. With a ``report`` (a validation pass) images without captions are
    reported and skipped, and empty or duplicate captions are reported instead of warned about.
    """
    path = resolve_karpathy_file(captions_path)
    base = Path(images_path) if images_path not in (None, "") else path.parent
    data = _parse_json(_read_utf8(path, "Karpathy captions json"), str(path))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: field 'images' is missing or not a list (expected Karpathy's format; this is "
                           f"{_describe_json(data)})")
    collect = _Collector(path, report)
    records: list[ImageRecord] = []
    seen: dict[int, int] = {}
    for index, item in enumerate(data["images"]):
        where = f"{path}: item {index}"
        record = _karpathy_record(item, where, base, collect)
        image_id = record.image_id if record is not None else _karpathy_id(item, where)
        if image_id in seen:
            raise DatasetError(f"{where}: image id {image_id} duplicates item {seen[image_id]}")
        seen[image_id] = index
        if record is not None:
            records.append(record)
    collect.finish()
    return records


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


def _parse_json(text: str, where: str) -> Any:
    """json.loads, with an error naming the place (a one-line text: its column only)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"column {exc.colno}" if exc.lineno == 1 and "\n" not in text.strip() else \
            f"line {exc.lineno}, column {exc.colno}"
        raise DatasetError(f"{where}: invalid JSON at {at}: {exc.msg}") from None


def _manifest_item(line: str, where: str) -> tuple[str, list[Any], str, Any]:
    """(image, captions, split, image_id or None) of one manifest line, or raise naming the field."""
    item = _parse_json(line, where)
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
    return image, item["captions"], _normalise_split(item["split"], where), item.get("image_id")


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
    text = _read_utf8(manifest, "manifest")
    collect = _Collector(manifest, report)
    records: list[ImageRecord] = []
    seen: dict[int, int] = {}
    position = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{manifest}: line {lineno}"
        image, raw_captions, split, raw_id = _manifest_item(line, where)
        image_id = position if raw_id is None else _as_int_id(raw_id, where, "image_id")
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
    if kind == "manifest":
        return load_manifest(path, images_path, report)
    if kind in ("karpathy", "karpathy-folder"):
        return load_karpathy_json(path, images_path, report)
    if kind in ("json", "captions-json") and path.suffix.lower() in MANIFEST_SUFFIXES:
        return load_manifest(path, images_path, report)  # one object, named as a manifest: its reader explains
    if kind == "json":  # a JSON document not recognised from its start: Karpathy's reader explains
        return load_karpathy_json(path, images_path, report)
    raise _not_a_dataset(path, kind)


def split_records(records: Iterable[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """Group records by split ("train", "val", "test" always present), keeping the input order."""
    groups: dict[str, list[ImageRecord]] = {split: [] for split in SPLITS}
    for record in records:
        if record.split not in groups:
            raise DatasetError(f"image {record.image_id} ({record.path}): unknown split {record.split!r}")
        groups[record.split].append(record)
    return groups


def check_images_exist(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Return the records whose image file is missing (loaders skip them at read time with a warning)."""
    return [record for record in records if not record.path.is_file()]


def _where_found(records: Sequence[ImageRecord], images_path: str | os.PathLike[str]) -> str:
    """'images: 38 under photos/ (the images folder), 2 beside the manifest' for a manifest read with a folder."""
    looked = [r for r in records if len(r.tried) > 1 and r.path.is_file()]
    under = sum(1 for r in looked if r.path == r.tried[0])
    beside = len(looked) - under
    return (f"images: relative paths are looked up under {images_path} first, then beside the manifest: "
            f"{under} found under {images_path}, {beside} beside the manifest")


def check_dataset(
    captions_path: str | os.PathLike[str], images_path: str | os.PathLike[str] | None = None
) -> DataReport:
    """One validation pass over a dataset (or, for a captions file with ``images_path``, over what to-manifest
    would write): counts, splits, missing image files, images without captions, empty and duplicate captions,
    images listed twice, empty splits."""
    path = Path(captions_path)
    kind = captions_kind(path)
    if kind in CAPTION_FILE_KINDS:
        if images_path in (None, ""):
            raise DatasetError(f"{path}: this is {describe_kind(kind)}; check it against its images with --images "
                               f"FOLDER, or make a manifest from it: {_TO_MANIFEST.format(path=path)}")
        plan = plan_manifest(images_path, path)
        plan.report.header += " (what to-manifest would write; nothing is written by check)"
        return plan.report
    report = DataReport(f"{path}: {describe_kind(kind)}")
    records = load_records(path, images_path, report)
    captions = [len(r.captions) for r in records]
    if records:
        report.header += (f"; {plural(len(records), 'image')}, {plural(sum(captions), 'caption')} "
                          f"({min(captions)} to {max(captions)} per image)")
    if kind == "manifest" and images_path not in (None, ""):
        report.facts.append(_where_found(records, images_path))
    for record in check_images_exist(records):
        also = [str(p) for p in record.tried if p != record.path]
        report.add("missing_file", f"{record.path}" + (f" (also looked for {also[0]})" if also else ""))
    report.add_split_counts({name: len(group) for name, group in split_records(records).items()})
    return report


# ----------------------------------------------------------------------------------------------------------------
# Captions file (CSV, TSV, JSON) -> rows


@dataclass(frozen=True)
class CaptionRow:
    """One caption of a captions file: where it is ('line 3' or "entry 'a.jpg'"), the image name, the text."""

    where: str
    name: str
    caption: str

    @property
    def label(self) -> str:
        """'line 3 (a.jpg)' or "entry 'a.jpg'" (a JSON entry already names its image)."""
        return self.where if self.where.startswith("entry") else f"{self.where} ({self.name})"


def read_caption_rows(
    captions_file: str | os.PathLike[str], is_image: Callable[[str], bool] | None = None
) -> tuple[list[CaptionRow], str]:
    """The rows of a captions file and its form in words ('CSV with a header', ...).

    CSV ``image,caption`` and TSV ``image<TAB>caption`` may have a header: a first row whose first cell is not an
    image name (``is_image``; default: a known image suffix) is a header and must name the columns 'image' and
    'caption'. Without one the first column is the image and the rest of the row the caption. JSON is an object
    ``{"file.jpg": ["caption", ...]}``. Another kind of file (a manifest, an image, ...) is an error saying what
    it is."""
    path = Path(captions_file)
    kind = captions_kind(path)
    if kind in ("json", "captions-json"):
        return _rows_from_json(path, _read_utf8(path, "captions file")), "JSON {image: [captions]}"
    if kind in ("csv", "tsv", "text"):
        return _rows_from_table(path, kind, is_image or _has_image_suffix)
    raise _not_a_captions_file(path, kind)


def _not_a_captions_file(path: Path, kind: str) -> DatasetError:
    what = f"{path}: this is {describe_kind(kind)}"
    if kind == "manifest":
        return DatasetError(f"{what}, already what to-manifest writes: pass it as --captions_path to the scripts; "
                            f"check it with python -m data.captions check --captions {path}")
    if kind in ("karpathy", "karpathy-folder"):
        return DatasetError(f"{what}: the scripts read it as it is (--captions_path {path}), no manifest needed")
    return DatasetError(f"{what}, not a captions file; --captions takes a CSV image,caption, a TSV "
                        "image<TAB>caption or a JSON {\"file.jpg\": [captions]}")


def _has_image_suffix(name: str) -> bool:
    return Path(_FLICKR_CAPTION_SUFFIX.sub("", name.strip())).suffix.lower() in IMAGE_SUFFIXES


def _rows_from_json(path: Path, text: str) -> list[CaptionRow]:
    data = _parse_json(text, str(path))
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
    return rows


def _table_lines(path: Path, kind: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of the non-blank rows of a CSV (quoting as Excel writes it) or a TSV (plain tabs)."""
    text = _read_utf8(path, "captions file")
    if kind != "csv":
        lines = enumerate(text.split("\n"), start=1)
        return [(n, line.rstrip("\r").split("\t")) for n, line in lines if line.strip()]
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise DatasetError(f"{path}: line {reader.line_num}: {exc}") from None


def _header_columns(path: Path, lineno: int, cells: list[str], sep: str) -> tuple[int, int]:
    columns = [cell.strip().lower() for cell in cells]
    if "image" not in columns or "caption" not in columns:
        raise DatasetError(
            f"{path}: line {lineno}: the first row's first cell {cells[0].strip()!r} is not an image file name, so "
            f"the row is read as a header, and a header must name the columns 'image' and 'caption' (got "
            f"{sep.join(cells)!r}); rename them, or start the file with a row like 'photo.jpg{sep}a caption'"
        )
    return columns.index("image"), columns.index("caption")


def _rows_from_table(path: Path, kind: str, is_image: Callable[[str], bool]) -> tuple[list[CaptionRow], str]:
    sep, name = ("\t", "TSV") if kind != "csv" else (",", "CSV")
    table = _table_lines(path, kind)
    if not table:
        return [], f"{name} (empty)"
    image_col, caption_col, width = 0, 1, 2
    form = f"{name} without a header (columns image{sep}caption)"
    if not is_image(table[0][1][0]):
        image_col, caption_col = _header_columns(path, table[0][0], table[0][1], sep)
        table, form, width = table[1:], f"{name} with a header", len(table[0][1])
    rows = []
    for lineno, cells in table:
        image = cells[image_col].strip() if len(cells) > image_col else ""
        if not image:
            raise DatasetError(f"{path}: line {lineno}: the 'image' column is empty")
        # the caption is the last column: unquoted commas (tabs) in it split it into more cells, joined back here
        caption = sep.join(cells[caption_col:]) if caption_col == width - 1 else (
            cells[caption_col] if len(cells) > caption_col else "")
        rows.append(CaptionRow(f"line {lineno}", image, caption))
    return rows, form


# ----------------------------------------------------------------------------------------------------------------
# Folder + captions file -> manifest


def _resolve_image_name(images: Path, name: str) -> str | None:
    """The image file name as found under ``images`` (dropping a Flickr8k ``#N`` suffix if needed), or None."""
    if (images / name).is_file():
        return name
    base_name = _FLICKR_CAPTION_SUFFIX.sub("", name)
    if base_name != name and (images / base_name).is_file():
        return base_name
    return None


def _parse_split_ratio(value: str | Sequence[float]) -> tuple[float, float, float]:
    """Parse "0.9,0.05,0.05" (train, val, test); the parts must be non-negative and sum to 1."""
    parts: list[float]
    try:
        parts = [float(part) for part in value.split(",")] if isinstance(value, str) else [float(v) for v in value]
    except ValueError:
        raise DatasetError(f"split ratio {value!r}: expected three numbers like 0.9,0.05,0.05") from None
    if len(parts) != 3 or any(part < 0 for part in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise DatasetError(f"split ratio {value!r}: expected three non-negative numbers summing to 1 (train,val,test)")
    return parts[0], parts[1], parts[2]


def _split_sizes(count: int, ratio: tuple[float, float, float]) -> tuple[int, int, int]:
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


def _assign_splits(count: int, ratio: tuple[float, float, float], seed: int) -> list[str]:
    """Deterministically assign train/val/test to ``count`` items in the given proportions (see _split_sizes)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_train, n_val, _ = _split_sizes(count, ratio)
    splits = ["test"] * count
    for rank, index in enumerate(order):
        if rank < n_train:
            splits[index] = "train"
        elif rank < n_train + n_val:
            splits[index] = "val"
    return splits


def _group_rows(rows: list[CaptionRow], images: Path, report: DataReport, skip_missing: bool) -> dict[str, list[str]]:
    """Captions by image file name (in first-seen order), dropping and reporting empty and duplicate captions,
    images with only empty captions and rows whose image is not in the folder."""
    by_image: dict[str, list[str]] = {}
    keys: dict[str, set[str]] = {}
    empty: dict[str, list[str]] = {}
    missing_kind = "missing_row_skipped" if skip_missing else "missing_row"
    for row in rows:
        resolved = _resolve_image_name(images, row.name)
        if resolved is None:
            report.add(missing_kind, row.where if row.where.startswith("entry") else f"{row.where} {row.name!r}")
            continue
        captions = by_image.setdefault(resolved, [])
        caption = row.caption.strip()
        if not caption:
            empty.setdefault(resolved, []).append(row.label)
        elif _caption_key(caption) in keys.setdefault(resolved, set()):
            report.add("duplicate_dropped", f"{row.label} {caption!r}")
        else:
            keys[resolved].add(_caption_key(caption))
            captions.append(caption)
    for name, labels in empty.items():
        if by_image[name]:
            for label in labels:
                report.add("empty_caption", label)
        else:
            where = labels[0].split(" (")[0] if len(labels) == 1 else f"{len(labels)} rows"
            report.add("only_empty", name if where.startswith("entry") else f"{name} ({where})")
    return by_image


def _folder_images(images: Path) -> list[str]:
    """Image files under a folder (subfolders included), as names relative to it, sorted."""
    found = []
    for root, dirs, files in os.walk(images):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(images)
        found += [(rel / f).as_posix() for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _report_unlisted(images: Path, by_image: dict[str, list[str]], report: DataReport) -> None:
    """Images in the folder that no caption row names."""
    named = {Path(os.path.normpath(name)).as_posix() for name in by_image}
    for name in _folder_images(images):
        if name not in named:
            report.add("unlisted_image", name)


def _choose_splits(
    count: int, split: str | None, split_ratio: str | Sequence[float] | None, seed: int, report: DataReport
) -> list[str]:
    """Every image's split: the one given, a seeded random draw in the given proportions, or the default draw
    (said in the report)."""
    if split is not None:
        if split not in SPLITS:
            raise DatasetError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        report.add_split_counts({split: count}, f"every image in {split} (--split {split}): ")
        return [split] * count
    ratio = _parse_split_ratio(split_ratio) if split_ratio is not None else DEFAULT_SPLIT_RATIO
    shown = ",".join(f"{share:g}" for share in ratio)
    how = (f"drawn at random {shown} with seed {seed}: " if split_ratio is not None else
           f"neither --split nor --split-ratio given, so drawn at random {shown} with seed {seed} (--split-ratio "
           "and --seed choose; --split NAME puts every image in one split): ")
    splits = _assign_splits(count, ratio, seed)
    report.add_split_counts({name: splits.count(name) for name in SPLITS}, how)
    return splits


@dataclass
class ManifestPlan:
    """What to-manifest would write: (image name under ``images``, captions, split) per image, and the report."""

    images: Path
    entries: list[tuple[str, tuple[str, ...], str]]
    report: DataReport

    @property
    def blocking(self) -> str:
        """Why nothing may be written ('' when the plan can be written)."""
        if "missing_row" in self.report.found:
            return (f"nothing written: {self.report.title('missing_row')} (pass --skip-missing to leave such rows "
                    "out)")
        if not self.entries:
            return "nothing written: no image has a caption"
        return ""

    def write(self, output: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the manifest, image paths relative to its folder; an existing file only with ``overwrite``."""
        target = Path(output)
        _refuse_existing(target, overwrite)
        out_dir = os.path.abspath(target.parent)
        lines = []
        for image_id, (name, captions, split) in enumerate(self.entries):
            relative = Path(os.path.relpath(os.path.abspath(self.images / name), out_dir)).as_posix()
            record = {"image": relative, "captions": list(captions), "split": split, "image_id": image_id}
            lines.append(json.dumps(record, ensure_ascii=False))
        return atomic_write_text(target, "\n".join(lines) + "\n")


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: output manifest already exists (pass overwrite=True / --overwrite)")


def plan_manifest(
    images_dir: str | os.PathLike[str],
    captions_file: str | os.PathLike[str],
    split: str | None = None,
    split_ratio: str | Sequence[float] | None = None,
    seed: int = 0,
    skip_missing: bool = False,
) -> ManifestPlan:
    """Read a captions file against a folder of images and validate it in one pass (nothing is written).

    Empty and duplicate captions are dropped, images with no caption left out, rows naming images not in the folder
    reported (and left out with ``skip_missing``; otherwise the plan is ``blocking``). Every image gets ``split``;
    or, with ``split_ratio`` (train,val,test) or by default 0.9,0.05,0.05, a random split drawn with ``seed``.
    """
    images, source = Path(images_dir), Path(captions_file)
    if split is not None and split_ratio is not None:
        raise DatasetError("give --split (one split for every image) or --split-ratio, not both")
    if not images.is_dir():
        raise _not_found(images, "images folder") if not images.exists() else DatasetError(
            f"{images}: not a folder; --images takes the folder holding the images")
    rows, form = read_caption_rows(source, lambda name: _has_image_suffix(name) or (images / name.strip()).is_file())
    report = DataReport(f"{source}: {form}, {plural(len(rows), 'caption row')}; images in {images}",
                        context={"images": str(images)})
    by_image = _group_rows(rows, images, report, skip_missing)
    _report_unlisted(images, by_image, report)
    kept = [(name, tuple(captions)) for name, captions in by_image.items() if captions]
    splits = _choose_splits(len(kept), split, split_ratio, seed, report)
    entries = [(name, captions, image_split) for (name, captions), image_split in zip(kept, splits)]
    report.header += f" -> {plural(len(entries), 'image')} with captions"
    return ManifestPlan(images, entries, report)


def folder_to_manifest(
    images_dir: str | os.PathLike[str],
    captions_file: str | os.PathLike[str],
    output: str | os.PathLike[str],
    split: str | None = None,
    overwrite: bool = False,
    split_ratio: str | Sequence[float] | None = None,
    seed: int = 0,
    skip_missing: bool = False,
) -> int:
    """Write a JSON-lines manifest from a folder of images and a captions file; return the number of images.

    See :func:`plan_manifest` for the captions file and the splits (by default a random 0.9,0.05,0.05 drawn with
    ``seed``). Image paths are written relative to the manifest's folder. Captions naming images missing from the
    folder are an error unless ``skip_missing``; an existing ``output`` is only replaced with ``overwrite``.
    Call plan_manifest() and ManifestPlan.write() to show the validation summary too.
    """
    _refuse_existing(Path(output), overwrite)
    plan = plan_manifest(images_dir, captions_file, split, split_ratio, seed, skip_missing)
    if plan.blocking:
        problems = plan.report.found.get("missing_row", [])
        raise DatasetError(f"{captions_file}: {plan.blocking}" + (f": {_listed(problems)}" if problems else ""))
    plan.write(output, overwrite)
    return len(plan.entries)


# ----------------------------------------------------------------------------------------------------------------
# Command line


class _Parser(ArgumentParser):
    """utils.cli's parser (no abbreviations, did-you-mean) with this module's one-line 'error: ...' (exit 2)."""

    argv: Sequence[str] = ()  # the command line being parsed, to suggest the flags of its command

    def error(self, message: str) -> None:  # type: ignore[override]
        command = next((arg for arg in self.argv if arg in _commands(self)), "")
        prog = f"{self.prog} {command}" if command else self.prog
        self.exit(2, f"error: {message}{_did_you_mean(self, command, message)} ({prog} --help)\n")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _did_you_mean(parser: argparse.ArgumentParser, command: str, message: str) -> str:
    """'; --skip-mising: did you mean --skip-missing?' for each unrecognized flag close to one of the command's."""
    if "unrecognized arguments" not in message:
        return ""
    scope = _commands(parser).get(command, parser)
    known = sorted(flag for flag in scope._option_string_actions if flag.startswith("--"))
    hints = []
    for flag in re.findall(r"(--?[\w-]+)", message.split(":", 1)[-1]):
        match = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
        if match:
            hints.append(f"{flag}: did you mean {match[0]}?")
    return ("; " + "; ".join(hints)) if hints else ""


def _command(commands: Any, name: str, help: str, paths: list[tuple[str, bool, str]]) -> argparse.ArgumentParser:
    """A sub-command with its path flags: (NAME, required, help) -> --NAME, also spelt --NAME_path (the
    reference's spelling)."""
    command = commands.add_parser(name, help=help, description=__doc__)
    for flag, required, text in paths:
        command.add_argument(f"--{flag}", f"--{flag}_path", dest=flag, required=required, default=None, help=text)
    return command


def _build_parser() -> _Parser:
    parser = _Parser(prog="python -m data.captions", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{to-manifest,check}")
    convert = _command(commands, "to-manifest", "write a JSON-lines manifest from a folder and a captions file", [
        ("images", True, "folder holding the images (the captions file's names are relative to it)"),
        ("captions", True, "CSV image,caption or TSV image<TAB>caption (header optional), or JSON {image: [...]}"),
        ("output", True, "manifest to write (.jsonl)")])
    splits = convert.add_mutually_exclusive_group()
    splits.add_argument("--split", choices=SPLITS, default=None, help="put every image in this split")
    splits.add_argument("--split-ratio", "--split_ratio", dest="split_ratio", default=None,
                        help="random train,val,test proportions (default 0.9,0.05,0.05 when --split is not given)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    convert.add_argument("--skip-missing", "--skip_missing", dest="skip_missing", action="store_true",
                         help="leave out caption rows whose image is not in --images (default: write nothing)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _command(commands, "check", "validate a dataset and report every problem in one summary", [
        ("captions", True, "manifest (.jsonl), Karpathy json or its folder; or a captions file (with --images)"),
        ("images", False, "image folder: looked up first for a manifest's relative paths; Karpathy's image root")])
    return parser


def _run_to_manifest(args: argparse.Namespace) -> int:
    _refuse_existing(Path(args.output), args.overwrite)
    plan = plan_manifest(args.images, args.captions, args.split, args.split_ratio, args.seed, args.skip_missing)
    print(plan.report.text(), flush=True)
    if plan.blocking:
        print(f"error: {plan.blocking}", file=sys.stderr)
        return 2
    plan.write(args.output, args.overwrite)
    print(f"wrote {plural(len(plan.entries), 'image')} to {args.output}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    report = check_dataset(args.captions, args.images)
    print(report.text())
    return 1 if report.severe else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``to-manifest`` converts a folder + captions file; ``check`` validates a dataset (see the module docstring).

    Exit status: 0 done, 1 check found missing images or images without captions, 2 an error (one line)."""
    parser = _build_parser()
    parser.argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(parser.argv)
    try:
        return _run_to_manifest(args) if args.command == "to-manifest" else _run_check(args)
    except (DatasetError, OSError) as exc:  # FileExistsError is an OSError
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
