"""What the format readers share: strict UTF-8 and JSON reading with errors that name the place, caption checks,
the bookkeeping of one read (dropped, duplicate and missing captions), and a captions file's rows."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.records import IMAGE_SUFFIXES, DatasetError
from data.report import DataReport, listed
from utils.cli import closest

UTF8_BOM = b"\xef\xbb\xbf"
_FLICKR_CAPTION_SUFFIX = re.compile(r"#\d+$")


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


def not_found(path: Path, what: str) -> DatasetError:
    """'<path>: <what> not found', with the closest name in the same folder when there is one."""
    folder = path.parent
    if not folder.is_dir():
        return DatasetError(f"{path}: {what} not found (the folder {folder} does not exist)")
    close = closest(path.name, [entry.name for entry in folder.iterdir()])
    hint = f" (did you mean {folder / close}?)" if close else ""
    return DatasetError(f"{path}: {what} not found{hint}")


def read_utf8(path: Path, what: str) -> str:
    """Read a whole text file as strict UTF-8 (a leading BOM is allowed); errors name the file and byte offset."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found" if not path.exists() else f"{path}: {what} is not a file")
    raw = path.read_bytes()
    skip = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skip
        line = raw.count(b"\n", 0, offset) + 1
        raise DatasetError(
            f"{path}: not valid UTF-8 at byte offset {offset} (line {line}): {raw[offset : offset + 4]!r}; "
            "save the file as UTF-8"
        ) from None


def parse_json(text: str, where: str) -> Any:
    """json.loads, with an error naming the place (a one-line text: its column only)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"column {exc.colno}" if exc.lineno == 1 and "\n" not in text.strip() else \
            f"line {exc.lineno}, column {exc.colno}"
        raise DatasetError(f"{where}: invalid JSON at {at}: {exc.msg}") from None


def as_int_id(value: Any, where: str, field_name: str) -> int:
    """Accept a JSON integer id (not a bool, not a float) or raise naming the field."""
    if type(value) is not int:
        raise DatasetError(f"{where}: field {field_name!r} must be an integer, got {value!r}")
    return value


def caption_key(caption: str) -> str:
    """Captions that tokenise the same (case and spacing aside) are duplicates."""
    return " ".join(caption.split()).lower()


def without_flickr_suffix(name: str) -> str:
    """'a.jpg#2' -> 'a.jpg': Flickr8k's token file numbers each image's captions."""
    return _FLICKR_CAPTION_SUFFIX.sub("", name)


def looks_like_image_name(name: str) -> bool:
    """A file name with a known image suffix (a Flickr8k '#N' after it allowed)."""
    return Path(without_flickr_suffix(name.strip())).suffix.lower() in IMAGE_SUFFIXES


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


class Collector:
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
        keys = [caption_key(c) for c in captions]
        for position, key in enumerate(keys):
            if key in keys[:position]:
                self.report.add("duplicate_kept", f"{label} {captions[position]!r}")
        return captions

    def image(self, path: Path, label: str) -> None:
        """Note where an image is, so that a validation pass reports one listed twice."""
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
        places = listed([label + (f" x{count}" if count > 1 else "") for label, count in self.dropped])
        warnings.warn(f"{self.source}: dropped {total} empty caption(s) at {places}", UserWarning, stacklevel=4)
