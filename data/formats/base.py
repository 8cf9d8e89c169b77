"""What a dataset format is: how a captions path is recognised from its content (Sample), and the Format record that
data.formats registers once per kind of path, with its reader when it has one."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from data.formats.reading import UTF8_BOM, CaptionRow
from data.records import ImageRecord
from data.report import DataReport

SNIFF_BYTES = 1 << 16
_NOT_JSON = object()
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x89HDF", "an HDF5 file (a feature file?)"),
    (b"PK\x03\x04", "a zip archive (a PyTorch checkpoint is one)"),
)

# (captions path, images folder or None, report of a validation pass or None) -> records
RecordReader = Callable[[Path, str | os.PathLike[str] | None, DataReport | None], list[ImageRecord]]
# (captions file, is this first cell an image name?) -> (rows, the file's form in words)
RowReader = Callable[[Path, Callable[[str], bool]], tuple[list[CaptionRow], str]]


def to_manifest_command(captions: str | os.PathLike[str], images: str | os.PathLike[str] = "IMAGES_FOLDER") -> str:
    """The to-manifest command line that makes a manifest of a captions file."""
    return (f"python -m data.captions to-manifest --images_path {images} --captions_path {captions} "
            "--output manifest.jsonl")


def make_a_manifest(path: Path, expected: str) -> str:
    """The end of the error for a captions file given where a dataset is read."""
    return f", not a dataset; make a manifest from it: {to_manifest_command(path)}"


@dataclass(frozen=True)
class Sample:
    """What recognising a captions path looks at: a folder, or the start of a file (64 KiB, a leading BOM and
    whitespace dropped) as text, and whether that start is the whole file."""

    path: Path
    folder: bool
    text: str = ""
    complete: bool = True

    @classmethod
    def of(cls, path: Path) -> Sample | str:
        """The sample of an existing path, or 'binary:<description>' for an image or another binary file."""
        if path.is_dir():
            return cls(path, folder=True)
        with open(path, "rb") as handle:
            raw = handle.read(SNIFF_BYTES + 1)
        complete = len(raw) <= SNIFF_BYTES
        raw = raw[len(UTF8_BOM):] if raw.startswith(UTF8_BOM) else raw
        for magic, description in _MAGIC:
            if raw.startswith(magic):
                return f"binary:{description}"
        if raw.startswith(b"RIFF") and raw[8:12] == b"WEBP":
            return "binary:a WebP image"
        if b"\x00" in raw:
            return "binary:a binary file"
        return cls(path, False, raw[:SNIFF_BYTES].decode("utf-8", errors="replace").lstrip(), complete)

    @property
    def blank(self) -> bool:
        """A file holding nothing but whitespace."""
        return not self.folder and not self.text.strip()

    @property
    def looks_json(self) -> bool:
        """A file starting with '{' or '[': JSON lines or one JSON document."""
        return self.text[:1] in ("{", "[")

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0]

    @cached_property
    def json_lines(self) -> bool:
        """A whole JSON value on the first line and more lines after it."""
        first, _, rest = self.text.partition("\n")
        if not self.looks_json or not rest.strip():
            return False
        try:
            json.loads(first)
        except json.JSONDecodeError:
            return False
        return True

    @cached_property
    def document(self) -> Any:
        """The parsed JSON document (not JSON lines) when the whole file was read; _NOT_JSON otherwise."""
        if not self.looks_json or self.json_lines or not self.complete:
            return _NOT_JSON
        try:
            return json.loads(self.text)
        except json.JSONDecodeError:
            return _NOT_JSON

    def has_key(self, key: str) -> bool:
        """A JSON object with this key; in a file too long to parse whole, a '"key": [' in its start."""
        if not self.looks_json or self.json_lines:
            return False
        if not self.complete:
            return re.search(rf'"{re.escape(key)}"\s*:\s*\[', self.text) is not None
        return isinstance(self.document, dict) and key in self.document


@dataclass(frozen=True)
class Format:
    """One kind of captions path: its name, what it is in words, how it is recognised, its reader if it has one,
    and what an error says when it is given where it cannot be read.

    A dataset format (``read_records``) is what the scripts' --captions_path reads; a captions-file format
    (``read_rows``) is what to-manifest turns into a manifest; a format with neither is recognised only to say what
    the path is and what to give instead. ``listed_as`` names the format in the lists of what a reader takes ('' to
    leave it out). ``as_dataset`` / ``as_captions`` end the error where this kind is given as a dataset / as a
    captions file and cannot be read as one, from the path and the reader's 'expected ...' (None: a plain 'not a
    captions file; expected ...').
    """

    kind: str
    description: str
    recognises: Callable[[Sample], bool]
    read_records: RecordReader | None = None
    read_rows: RowReader | None = None
    listed_as: str = ""
    as_dataset: Callable[[Path, str], str] | None = None
    as_captions: Callable[[Path, str], str] | None = None
