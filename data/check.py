"""One validation pass over a dataset, or over what to-manifest would write from a captions file: counts, splits,
missing image files, images without captions, empty and duplicate captions, images listed twice, empty splits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from data.formats import CAPTION_FILE_KINDS, captions_kind, describe_kind, load_records
from data.formats.base import to_manifest_command
from data.formats.manifest import MANIFEST
from data.records import DatasetError, ImageRecord, check_images_exist
from data.report import DataReport, plural
from data.splits import split_records
from data.to_manifest import plan_manifest


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
            raise DatasetError(f"{path}: this is {describe_kind(kind)}; check it against its images with "
                               f"--images_path FOLDER, or make a manifest from it: {to_manifest_command(path)}")
        plan = plan_manifest(images_path, path)
        plan.report.header += " (what to-manifest would write; nothing is written by check)"
        return plan.report
    report = DataReport(f"{path}: {describe_kind(kind)}")
    records = load_records(path, images_path, report)
    captions = [len(r.captions) for r in records]
    if records:
        report.header += (f"; {plural(len(records), 'image')}, {plural(sum(captions), 'caption')} "
                          f"({min(captions)} to {max(captions)} per image)")
    if kind == MANIFEST.kind and images_path not in (None, ""):
        report.facts.append(_where_found(records, images_path))
    for record in check_images_exist(records):
        also = [str(p) for p in record.tried if p != record.path]
        report.add("missing_file", f"{record.path}" + (f" (also looked for {also[0]})" if also else ""))
    report.add_split_counts({name: len(group) for name, group in split_records(records).items()})
    return report
