"""Kinds of path that no reader takes, recognised only to say what they are and what to give instead."""

from __future__ import annotations

from pathlib import Path

from data.formats.base import Format, Sample, to_manifest_command
from data.formats.karpathy import KARPATHY_FILENAMES
from data.formats.manifest import MANIFEST_SUFFIXES
from data.records import IMAGE_SUFFIXES


def _use_karpathy(path: Path, expected: str) -> str:
    return ", which is not read here; use Karpathy's dataset_coco.json (the same captions with train/val/test splits)"


def _caption_your_images(path: Path, expected: str) -> str:
    return (f", not a captions file ({expected}); to caption your own images, make a manifest: "
            f"{to_manifest_command('captions.csv', images=path)}")


def _name_the_manifest(path: Path, expected: str) -> str:
    manifests = sorted(p.name for p in path.iterdir() if p.suffix.lower() in MANIFEST_SUFFIXES)
    hint = f" (it holds {', '.join(manifests[:3])}: pass that file)" if manifests else ""
    return f" without {' or '.join(KARPATHY_FILENAMES)}; {expected}{hint}"


def _holds_images(sample: Sample) -> bool:
    return sample.folder and any(entry.suffix.lower() in IMAGE_SUFFIXES for entry in sample.path.iterdir())


COCO_ANNOTATIONS = Format(
    kind="coco-annotations",
    description="COCO's caption annotations (an 'annotations' list, as in captions_train2014.json)",
    recognises=lambda sample: sample.has_key("annotations"), as_dataset=_use_karpathy)
JSON = Format(kind="json", description="a JSON document", recognises=lambda sample: sample.looks_json)
EMPTY = Format(kind="empty", description="an empty file", recognises=lambda sample: sample.blank)
IMAGE_FOLDER = Format(kind="image-folder", description="a folder of images", recognises=_holds_images,
                      as_dataset=_caption_your_images)
FOLDER = Format(kind="folder", description="a folder", recognises=lambda sample: sample.folder,
                as_dataset=_name_the_manifest)
