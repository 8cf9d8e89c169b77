"""Captions tables, to-manifest's captions files: CSV ``image,caption`` (quoting as Excel writes it) and TSV
``image<TAB>caption`` (Flickr8k's ``name.jpg#N`` accepted), each with or without a header.

A first row whose first cell is not an image name is a header, and must name the columns 'image' and 'caption' (in
any order; other columns are ignored). Without one the first column is the image and the rest of the row the caption.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

from data.formats.base import Format, Sample, make_a_manifest
from data.formats.reading import CaptionRow, read_utf8
from data.records import DatasetError


def _table_lines(path: Path, comma: bool) -> list[tuple[int, list[str]]]:
    """(line number, cells) of the non-blank rows of a CSV (quoting as Excel writes it) or a TSV (plain tabs)."""
    text = read_utf8(path, "captions file")
    if not comma:
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


def _read_table(path: Path, is_image: Callable[[str], bool], sep: str) -> tuple[list[CaptionRow], str]:
    """The rows of a table separated by ``sep`` and its form in words ('CSV with a header', ...)."""
    name = "CSV" if sep == "," else "TSV"
    table = _table_lines(path, comma=sep == ",")
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


def read_csv(path: Path, is_image: Callable[[str], bool]) -> tuple[list[CaptionRow], str]:
    return _read_table(path, is_image, ",")


def read_tsv(path: Path, is_image: Callable[[str], bool]) -> tuple[list[CaptionRow], str]:
    """A TSV, or a text file with neither a tab nor a comma on its first line (read as one, its rows say what is
    wrong)."""
    return _read_table(path, is_image, "\t")


def _table_text(sample: Sample) -> bool:
    """Text that is neither empty nor JSON."""
    return not sample.folder and not sample.blank and not sample.looks_json


TSV = Format(
    kind="tsv", description="a captions TSV (image<TAB>caption)",
    recognises=lambda sample: _table_text(sample) and "\t" in sample.first_line,
    read_rows=read_tsv, listed_as="a TSV image<TAB>caption", as_dataset=make_a_manifest)
CSV = Format(
    kind="csv", description="a captions CSV (image,caption)",
    recognises=lambda sample: _table_text(sample) and "," in sample.first_line,
    read_rows=read_csv, listed_as="a CSV image,caption", as_dataset=make_a_manifest)
TEXT = Format(
    kind="text", description="a text file with neither a comma nor a tab on its first line",
    recognises=_table_text, read_rows=read_tsv, as_dataset=make_a_manifest)
