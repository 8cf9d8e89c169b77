"""Karpathy's dataset_{coco,flickr8k,flickr30k}.json (or a folder holding one): an 'images' list with splits.

The image path is ``images_path / filepath / filename`` (``filepath`` is absent for Flickr); ``images_path`` defaults
to the json's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from data.formats.base import Format, Sample
from data.formats.reading import Collector, as_int_id, parse_json, read_utf8
from data.records import DatasetError, ImageRecord
from data.report import DataReport
from data.splits import normalise_split

KARPATHY_FILENAMES: tuple[str, ...] = ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json")


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
        return as_int_id(item["cocoid"], where, "cocoid")
    if "imgid" in item:
        return as_int_id(item["imgid"], where, "imgid")
    raise DatasetError(f"{where}: field 'cocoid' (or 'imgid') is missing")


def _karpathy_record(item: Any, where: str, base: Path, collect: Collector) -> ImageRecord | None:
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
    split = normalise_split(item["split"], where)
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
    """What a JSON document without Karpathy's 'images' list is, for the error."""
    if isinstance(data, dict) and "annotations" in data:
        return "COCO's caption annotations (an 'annotations' list, as in captions_train2014.json)"
    return f"a JSON {type(data).__name__}" if not isinstance(data, dict) else "a JSON object without 'images'"


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
    data = parse_json(read_utf8(path, "Karpathy captions json"), str(path))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: field 'images' is missing or not a list (expected Karpathy's format; this is "
                           f"{_describe_json(data)})")
    collect = Collector(path, report)
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


def _read_as_it_is(path: Path, expected: str) -> str:
    return f": the scripts read it as it is (--captions_path {path}), no manifest needed"


KARPATHY = Format(
    kind="karpathy", description="Karpathy's dataset json (an 'images' list)",
    recognises=lambda sample: sample.has_key("images"),
    read_records=load_karpathy_json, listed_as="Karpathy's dataset json", as_captions=_read_as_it_is)


def _holds_karpathy_json(sample: Sample) -> bool:
    return sample.folder and any((sample.path / name).is_file() for name in KARPATHY_FILENAMES)


KARPATHY_FOLDER = Format(
    kind="karpathy-folder", description="a folder holding Karpathy's dataset json",
    recognises=_holds_karpathy_json, read_records=load_karpathy_json, listed_as="its folder",
    as_captions=_read_as_it_is)
