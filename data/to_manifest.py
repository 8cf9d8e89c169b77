"""A folder of images and a captions file (CSV, TSV, JSON) -> a JSON-lines manifest, validated in one pass.

Empty and duplicate captions are dropped, images with no caption left out, rows naming images not in the folder
reported (and left out with skip_missing; otherwise nothing is written); every image gets the given split, or a
seeded random one (0.9,0.05,0.05 by default). Image paths are written relative to the manifest's folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data.formats import read_caption_rows
from data.formats.reading import CaptionRow, caption_key, looks_like_image_name, not_found, without_flickr_suffix
from data.records import IMAGE_SUFFIXES, DatasetError
from data.report import DataReport, plural
from data.splits import DEFAULT_SPLIT_RATIO, SPLITS, assign_splits, parse_split_ratio
from utils.files import atomic_write_text


def _resolve_image_name(images: Path, name: str) -> str | None:
    """The image file name as found under ``images`` (dropping a Flickr8k ``#N`` suffix if needed), or None."""
    if (images / name).is_file():
        return name
    base_name = without_flickr_suffix(name)
    if base_name != name and (images / base_name).is_file():
        return base_name
    return None


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
        elif caption_key(caption) in keys.setdefault(resolved, set()):
            report.add("duplicate_dropped", f"{row.label} {caption!r}")
        else:
            keys[resolved].add(caption_key(caption))
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
    ratio = parse_split_ratio(split_ratio) if split_ratio is not None else DEFAULT_SPLIT_RATIO
    shown = ",".join(f"{share:g}" for share in ratio)
    how = (f"drawn at random {shown} with seed {seed}: " if split_ratio is not None else
           f"neither --split nor --split_ratio given, so drawn at random {shown} with seed {seed} (--split_ratio "
           "and --seed choose; --split NAME puts every image in one split): ")
    splits = assign_splits(count, ratio, seed)
    report.add_split_counts({name: splits.count(name) for name in SPLITS}, how)
    return splits


def refuse_existing(target: Path, overwrite: bool) -> None:
    """Refuse to replace an existing manifest unless asked to."""
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: output manifest already exists (pass overwrite=True / --overwrite)")


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
            return (f"nothing written: {self.report.title('missing_row')} (pass --skip_missing to leave such rows "
                    "out)")
        if not self.entries:
            return "nothing written: no image has a caption"
        return ""

    def write(self, output: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the manifest, image paths relative to its folder; an existing file only with ``overwrite``."""
        target = Path(output)
        refuse_existing(target, overwrite)
        out_dir = os.path.abspath(target.parent)
        lines = []
        for image_id, (name, captions, split) in enumerate(self.entries):
            relative = Path(os.path.relpath(os.path.abspath(self.images / name), out_dir)).as_posix()
            record = {"image": relative, "captions": list(captions), "split": split, "image_id": image_id}
            lines.append(json.dumps(record, ensure_ascii=False))
        return atomic_write_text(target, "\n".join(lines) + "\n")


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
        raise DatasetError("give --split (one split for every image) or --split_ratio, not both")
    if not images.is_dir():
        raise not_found(images, "images folder") if not images.exists() else DatasetError(
            f"{images}: not a folder; --images_path takes the folder holding the images")
    def is_image(cell: str) -> bool:  # a table's first cell: an image name, or a file in the folder
        return looks_like_image_name(cell) or (images / cell.strip()).is_file()

    rows, form = read_caption_rows(source, is_image)
    report = DataReport(f"{source}: {form}, {plural(len(rows), 'caption row')}; images in {images}",
                        context={"images": str(images)})
    by_image = _group_rows(rows, images, report, skip_missing)
    _report_unlisted(images, by_image, report)
    kept = [(name, tuple(captions)) for name, captions in by_image.items() if captions]
    splits = _choose_splits(len(kept), split, split_ratio, seed, report)
    entries = [(name, captions, image_split) for (name, captions), image_split in zip(kept, splits)]
    report.header += f" -> {plural(len(entries), 'image')} with captions"
    return ManifestPlan(images, entries, report)
