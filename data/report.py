"""The validation summary of a dataset: what was read, counts and splits, and every problem with what it means for
training (the text `python -m data.captions check|to-manifest` and pipeline.py's small preset print)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from data.splits import SPLITS

_MAX_LISTED = 10

# kind: (title for one, title for several, what it means for training, whether it stops training or loses images)
_PROBLEMS: dict[str, tuple[str, str, str, bool]] = {
    "missing_row": (
        "caption row names an image not in {images}", "caption rows name images not in {images}",
        "nothing is written: correct the names, or pass --skip_missing to leave these rows out", True),
    "missing_row_skipped": (
        "caption row names an image not in {images}", "caption rows name images not in {images}",
        "left out of the manifest (--skip_missing)", False),
    "missing_file": (
        "image file is missing", "image files are missing",
        "training skips them, and data_generator.py stops when more than --max_unreadable (default 0.05) of the "
        "images are missing; check --images_path", True),
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
        "--split_ratio 0.9,0.05,0.05", False),
    "no_test": (
        "no test images", "no test images",
        "test.py has nothing to score (test.py --split val scores the val images); assign a test split with "
        "to-manifest --split_ratio 0.9,0.05,0.05", False),
}
_SPLIT_PROBLEMS = {"train": "no_train", "val": "no_val", "test": "no_test"}


def plural(count: int, singular: str, many: str | None = None) -> str:
    """"3 images", "1 image": a count with its noun."""
    return f"{count} {singular if count == 1 else (many or singular + 's')}"


def listed(items: Sequence[str]) -> str:
    """The first few items, comma-separated, with 'and N more'."""
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


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
        shown = ", ".join(f"{name} {counts.get(name, 0)}" for name in SPLITS)
        self.facts.append(f"splits: {how}{shown}")
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
        """Each problem found, in a fixed order: its title with up to ten places, then what it means."""
        lines = []
        for kind in sorted(self.found, key=list(_PROBLEMS).index):
            examples = [p for p in self.found[kind] if p]
            lines.append(f"  - {self.title(kind)}" + (f": {listed(examples)}" if examples else ""))
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
