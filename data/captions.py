"""Caption dataset readers (Karpathy json, JSON-lines manifest) and folder-to-manifest conversion."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.files import atomic_write_text

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Karpathy's "restval" images are training images (the reference trains on train + restval).
_SPLIT_ALIASES: dict[str, str] = {"train": "train", "restval": "train", "val": "val", "test": "test"}
KARPATHY_FILENAMES: tuple[str, ...] = ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json")
MANIFEST_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")
_UTF8_BOM = b"\xef\xbb\xbf"
_FLICKR_CAPTION_SUFFIX = re.compile(r"#\d+$")
_MAX_LISTED = 10


class DatasetError(ValueError):
    """Malformed dataset input; the message names the file, the line or item and the field."""


@dataclass(frozen=True)
class ImageRecord:
    """One image with its reference captions and its split ("train", "val" or "test")."""

    image_id: int
    path: Path
    captions: tuple[str, ...]
    split: str


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


def _clean_captions(captions: Sequence[Any], where: str, field: str) -> tuple[tuple[str, ...], int]:
    """Check the captions are strings, drop empty/whitespace ones; return (kept, dropped) or raise if none is left."""
    kept: list[str] = []
    for position, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise DatasetError(f"{where}: field {field}[{position}] is {type(caption).__name__}, expected a string")
        if caption.strip():
            kept.append(caption)
    if not kept:
        detail = "is empty" if not captions else "holds only empty or whitespace captions"
        raise DatasetError(f"{where}: field {field!r} {detail}; every image needs at least one caption")
    return tuple(kept), len(captions) - len(kept)


def _warn_dropped(path: Path, dropped: list[tuple[str, int]]) -> None:
    """Emit one warning per file listing where empty captions were dropped."""
    if not dropped:
        return
    total = sum(count for _, count in dropped)
    listed = ", ".join(f"{where} ({count})" for where, count in dropped[:_MAX_LISTED])
    more = f" and {len(dropped) - _MAX_LISTED} more" if len(dropped) > _MAX_LISTED else ""
    warnings.warn(f"{path}: dropped {total} empty caption(s) at {listed}{more}", UserWarning, stacklevel=3)


def _as_int_id(value: Any, where: str, field: str) -> int:
    """Accept a JSON integer id (not a bool, not a float) or raise naming the field."""
    if type(value) is not int:
        raise DatasetError(f"{where}: field {field!r} must be an integer, got {value!r}")
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


def load_karpathy_json(
    captions_path: str | os.PathLike[str], images_path: str | os.PathLike[str] | None = None
) -> list[ImageRecord]:
    """Read Karpathy's dataset_{coco,flickr8k,flickr30k}.json (a file, or a folder holding exactly one).

    The image path is ``images_path / filepath / filename`` (``filepath`` is absent for Flickr); ``images_path``
    defaults to the json's folder. The id is ``cocoid``, or ``imgid`` when there is no cocoid. "restval" becomes
    "train". Records keep the file order.
    """
    path = resolve_karpathy_file(captions_path)
    base = Path(images_path) if images_path is not None else path.parent
    try:
        data = json.loads(_read_utf8(path, "Karpathy captions json"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: field 'images' is missing or not a list (expected Karpathy's format)")
    records: list[ImageRecord] = []
    seen: dict[int, int] = {}
    dropped: list[tuple[str, int]] = []
    for index, item in enumerate(data["images"]):
        where = f"{path}: item {index}"
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: expected an object, got {type(item).__name__}")
        filename = item.get("filename")
        if not isinstance(filename, str) or not filename:
            raise DatasetError(f"{where}: field 'filename' is missing or not a non-empty string")
        filepath = item.get("filepath", "")
        if not isinstance(filepath, str):
            raise DatasetError(f"{where}: field 'filepath' must be a string, got {filepath!r}")
        if "cocoid" in item:
            image_id = _as_int_id(item["cocoid"], where, "cocoid")
        elif "imgid" in item:
            image_id = _as_int_id(item["imgid"], where, "imgid")
        else:
            raise DatasetError(f"{where}: field 'cocoid' (or 'imgid') is missing")
        if image_id in seen:
            raise DatasetError(f"{where}: image id {image_id} duplicates item {seen[image_id]}")
        seen[image_id] = index
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
        captions, n_dropped = _clean_captions(raws, where, "sentences[*].raw")
        if n_dropped:
            dropped.append((f"item {index}", n_dropped))
        records.append(ImageRecord(image_id, base / filepath / filename, captions, split))
    _warn_dropped(path, dropped)
    return records


def load_manifest(path: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None) -> list[ImageRecord]:
    """Read a JSON-lines manifest: one ``{"image", "captions", "split", "image_id"?}`` object per line.

    Relative image paths resolve against ``base_dir`` (default: the manifest's folder). ``image_id`` defaults to the
    record's 0-based position among the non-blank lines. Blank lines are ignored.
    """
    manifest = Path(path)
    base = Path(base_dir) if base_dir is not None else manifest.parent
    text = _read_utf8(manifest, "manifest")
    records: list[ImageRecord] = []
    seen: dict[int, int] = {}
    dropped: list[tuple[str, int]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{manifest}: line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from None
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(item).__name__}")
        image = item.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DatasetError(f"{where}: field 'image' is missing or not a non-empty string")
        if "captions" not in item:
            raise DatasetError(f"{where}: field 'captions' is missing")
        if not isinstance(item["captions"], list):
            raise DatasetError(f"{where}: field 'captions' must be a list of strings")
        captions, n_dropped = _clean_captions(item["captions"], where, "captions")
        if n_dropped:
            dropped.append((f"line {lineno}", n_dropped))
        if "split" not in item:
            raise DatasetError(f"{where}: field 'split' is missing (one of {', '.join(SPLITS)})")
        split = _normalise_split(item["split"], where)
        raw_id = item.get("image_id")
        image_id = len(records) if raw_id is None else _as_int_id(raw_id, where, "image_id")
        if image_id in seen:
            raise DatasetError(f"{where}: field 'image_id' {image_id} duplicates line {seen[image_id]}")
        seen[image_id] = lineno
        image_path = Path(image)
        if not image_path.is_absolute():
            image_path = base / image_path
        records.append(ImageRecord(image_id, image_path, captions, split))
    _warn_dropped(manifest, dropped)
    return records


def load_records(
    captions_path: str | os.PathLike[str], images_path: str | os.PathLike[str] | None = None
) -> list[ImageRecord]:
    """Read a dataset: ``.jsonl``/``.ndjson`` is a manifest (``images_path`` is its base folder); a ``.json`` file or
    a folder is Karpathy's format (``images_path`` is the image root)."""
    path = Path(captions_path)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return load_manifest(path, images_path)
    if path.is_dir() or path.suffix.lower() == ".json":
        return load_karpathy_json(path, images_path)
    if not path.exists():
        raise DatasetError(f"{path}: captions file not found")
    raise DatasetError(f"{path}: unknown dataset format (expected a .jsonl manifest, a Karpathy .json or its folder)")


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


# ----------------------------------------------------------------------------------------------------------------
# Folder + captions file -> manifest


def _read_caption_rows(captions_file: Path) -> list[tuple[str, str, str]]:
    """Read (location, image name, caption) rows from a CSV ``image,caption``, a TSV or a JSON {image: [captions]}."""
    text = _read_utf8(captions_file, "captions file")
    suffix = captions_file.suffix.lower()
    stripped = text.lstrip()
    if suffix == ".json" or (suffix not in (".csv", ".tsv") and stripped.startswith("{")):
        return _rows_from_json(captions_file, text)
    first_line = stripped.split("\n", 1)[0]
    if suffix == ".tsv" or (suffix != ".csv" and "\t" in first_line):
        return _rows_from_tsv(captions_file, text)
    return _rows_from_csv(captions_file, text)


def _rows_from_json(path: Path, text: str) -> list[tuple[str, str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object mapping image file names to lists of captions")
    rows: list[tuple[str, str, str]] = []
    for name, captions in data.items():
        where = f"entry {name!r}"
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list):
            raise DatasetError(f"{path}: {where}: captions must be a list of strings, got {type(captions).__name__}")
        if not captions:
            raise DatasetError(f"{path}: {where}: the captions list is empty")
        for position, caption in enumerate(captions):
            if not isinstance(caption, str):
                kind = type(caption).__name__
                raise DatasetError(f"{path}: {where}: caption {position} is {kind}, expected a string")
            rows.append((where, name, caption))
    return rows


def _rows_from_csv(path: Path, text: str) -> list[tuple[str, str, str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    columns = [column.strip().lower() for column in header] if header else []
    if "image" not in columns or "caption" not in columns:
        raise DatasetError(f"{path}: line 1: the CSV header must name the columns 'image' and 'caption', got {header}")
    image_col, caption_col = columns.index("image"), columns.index("caption")
    rows: list[tuple[str, str, str]] = []
    for row in reader:
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"line {reader.line_num}"
        if len(row) <= max(image_col, caption_col):
            raise DatasetError(f"{path}: {where}: expected columns 'image' and 'caption', got {len(row)} column(s)")
        rows.append((where, row[image_col].strip(), row[caption_col]))
    return rows


def _rows_from_tsv(path: Path, text: str) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise DatasetError(f"{path}: line {lineno}: expected 'image<TAB>caption'")
        image, caption = line.split("\t", 1)
        if not rows and image.strip().lower() == "image" and caption.strip().lower() == "caption":
            continue  # header
        rows.append((f"line {lineno}", image.strip(), caption))
    return rows


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


def _assign_splits(count: int, ratio: tuple[float, float, float], seed: int) -> list[str]:
    """Deterministically assign train/val/test to ``count`` items in the given proportions."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_train = round(count * ratio[0])
    n_val = min(round(count * ratio[1]), count - n_train)
    splits = ["test"] * count
    for rank, index in enumerate(order):
        if rank < n_train:
            splits[index] = "train"
        elif rank < n_train + n_val:
            splits[index] = "val"
    return splits


def folder_to_manifest(
    images_dir: str | os.PathLike[str],
    captions_file: str | os.PathLike[str],
    output: str | os.PathLike[str],
    split: str = "train",
    overwrite: bool = False,
    split_ratio: str | Sequence[float] | None = None,
    seed: int = 0,
) -> int:
    """Write a JSON-lines manifest from a folder of images and a captions file; return the number of images.

    ``captions_file`` is a CSV with header ``image,caption`` (several rows per image allowed), a TSV
    ``image<TAB>caption`` (Flickr8k's ``name.jpg#N`` form is accepted) or a JSON ``{"file.jpg": ["cap", ...]}``.
    Image paths are written relative to the manifest's folder. Every image gets ``split``, or with ``split_ratio``
    (train,val,test) a deterministic random split drawn with ``seed``. Captions pointing to missing images are an
    error; an existing ``output`` is only replaced with ``overwrite``.
    """
    images = Path(images_dir)
    source = Path(captions_file)
    target = Path(output)
    if split not in SPLITS:
        raise DatasetError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    ratio = _parse_split_ratio(split_ratio) if split_ratio is not None else None
    if not images.is_dir():
        raise DatasetError(f"{images}: images folder not found")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: output manifest already exists (pass overwrite=True / --overwrite)")

    by_image: dict[str, list[str]] = {}
    missing: list[str] = []
    empty: list[str] = []
    for where, name, caption in _read_caption_rows(source):
        if not name:
            raise DatasetError(f"{source}: {where}: field 'image' is empty")
        resolved = _resolve_image_name(images, name)
        if resolved is None:
            missing.append(f"{where} {name!r}")
            continue
        captions = by_image.setdefault(resolved, [])
        if caption.strip():
            captions.append(caption.strip())
        else:
            empty.append(where)
    if missing:
        listed = "; ".join(missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DatasetError(f"{source}: {len(missing)} caption(s) point to images missing from {images}: {listed}{more}")
    no_caption = [name for name, caps in by_image.items() if not caps]
    if no_caption:
        raise DatasetError(f"{source}: image(s) with only empty captions: {', '.join(no_caption[:_MAX_LISTED])}")
    if not by_image:
        raise DatasetError(f"{source}: no captions found")
    if empty:
        listed = ", ".join(empty[:_MAX_LISTED])
        warnings.warn(f"{source}: dropped {len(empty)} empty caption(s) at {listed}", UserWarning, stacklevel=2)

    names = list(by_image)
    splits = _assign_splits(len(names), ratio, seed) if ratio is not None else [split] * len(names)
    out_dir = os.path.abspath(target.parent)
    lines = []
    for image_id, (name, image_split) in enumerate(zip(names, splits)):
        relative = Path(os.path.relpath(os.path.abspath(images / name), out_dir)).as_posix()
        record = {"image": relative, "captions": by_image[name], "split": image_split, "image_id": image_id}
        lines.append(json.dumps(record, ensure_ascii=False))
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, "\n".join(lines) + "\n")
    return len(names)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``to-manifest`` converts a folder + captions file; ``check`` validates a dataset."""
    parser = argparse.ArgumentParser(prog="python -m data.captions", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("to-manifest", help="write a JSON-lines manifest from a folder and a captions file")
    convert.add_argument("--images", required=True, help="folder holding the images")
    convert.add_argument("--captions", required=True, help="CSV 'image,caption', TSV or JSON {image: [captions]}")
    convert.add_argument("--output", required=True, help="manifest to write (.jsonl)")
    convert.add_argument("--split", choices=SPLITS, default=None, help="split for every image (default train)")
    convert.add_argument("--split-ratio", default=None, help="random train,val,test proportions, e.g. 0.9,0.05,0.05")
    convert.add_argument("--seed", type=int, default=0, help="seed for --split-ratio (default 0)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    check = commands.add_parser("check", help="validate a manifest or Karpathy json and report missing images")
    check.add_argument("--captions", required=True, help="manifest (.jsonl), Karpathy json or its folder")
    check.add_argument("--images", default=None, help="image root (Karpathy) or base folder (manifest)")
    args = parser.parse_args(argv)

    try:
        if args.command == "to-manifest":
            if args.split is not None and args.split_ratio is not None:
                parser.error("--split and --split-ratio are mutually exclusive")
            count = folder_to_manifest(
                args.images,
                args.captions,
                args.output,
                split=args.split or "train",
                overwrite=args.overwrite,
                split_ratio=args.split_ratio,
                seed=args.seed,
            )
            print(f"wrote {count} images to {args.output}")
            return 0
        records = load_records(args.captions, args.images)
        groups = split_records(records)
        print(", ".join(f"{name}: {len(group)}" for name, group in groups.items()) + f" images in {args.captions}")
        missing = check_images_exist(records)
        for record in missing[:_MAX_LISTED]:
            print(f"missing image: {record.path}", file=sys.stderr)
        if missing:
            print(f"{len(missing)} image file(s) missing", file=sys.stderr)
            return 1
        return 0
    except (DatasetError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
