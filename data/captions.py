"""Make a manifest from a folder of images and a captions file, or check a dataset, with one summary of problems.

Command line::

    python -m data.captions to-manifest --images_path photos/ --captions_path captions.csv \\
        --output_path manifest.jsonl \\
        [--split_ratio 0.9,0.05,0.05 --seed 0 | --split train] [--skip_missing True] [--overwrite True]
    python -m data.captions check --captions_path manifest.jsonl [--images_path photos/]

(--images, --captions, --split-ratio and --skip-missing are read too.) Captions files: CSV ``image,caption`` and TSV
``image<TAB>caption``, each with or without a header (a first row whose first cell is not an image file name is a
header, and must name the columns ``image`` and ``caption``; other columns are ignored), or JSON
``{"file.jpg": ["caption", ...]}``. Image names are relative to ``--images_path``.

Both commands print one summary: the counts per split and every problem with what it means for training (images
missing from the folder, images without captions, empty and duplicate captions, empty splits). ``to-manifest``
writes nothing while captions name missing images unless ``--skip_missing`` leaves those rows out; with neither
``--split`` nor ``--split_ratio`` it splits the images at random 0.9,0.05,0.05 (``--seed``, default 0) and says so.
``check`` reads a manifest, a Karpathy json or its folder, or a captions file with ``--images_path`` (what
to-manifest would write, without writing); it exits 1 when image files are missing or an image has no caption.
Errors are one line ``error: ...`` with exit status 2.

A manifest's relative image paths are looked up under ``--images_path`` when given and the file is there, otherwise
beside the manifest (see data.formats.manifest). Karpathy's json: ``images_path/filepath/filename`` (default: the
json's folder).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data.check import check_dataset
from data.records import DatasetError
from data.report import plural
from data.splits import SPLITS
from data.to_manifest import plan_manifest, refuse_existing
from utils.cli import ArgumentParser, add_dataclass_flags, dataclass_values, plain_warnings
from utils.fields import option


@dataclass(frozen=True)
class ToManifestConfig:
    """write a JSON-lines manifest from a folder and a captions file"""

    images_path: str = option("", "folder holding the images (the captions file's names are relative to it)",
                              aliases=("--images",), required=True, group="data")
    captions_path: str = option("", "CSV image,caption or TSV image<TAB>caption (header optional), or JSON "
                                "{image: [...]}", aliases=("--captions",), required=True, group="data")
    output_path: str = option("", "manifest to write (.jsonl)", aliases=("--output",), required=True, group="data")
    split: str = option("", "put every image in this split (default: a random split, see --split_ratio)",
                        choices=SPLITS, group="data")
    split_ratio: str = option("", "random train,val,test proportions (default: 0.9,0.05,0.05 when --split is not "
                              "given)", aliases=("--split-ratio",), group="data")
    seed: int = option(0, "seed of the random split", group="data")
    skip_missing: bool = option(False, "leave out caption rows whose image is not in --images_path (default: write "
                                "nothing)", aliases=("--skip-missing",), group="data")
    overwrite: bool = option(False, "replace an existing output file", group="runtime")


@dataclass(frozen=True)
class CheckConfig:
    """validate a dataset and report every problem in one summary"""

    captions_path: str = option("", "manifest (.jsonl), Karpathy json or its folder; or a captions file (with "
                                "--images_path)", aliases=("--captions",), required=True, group="data")
    images_path: str = option("", "image folder: looked up first for a manifest's relative paths; Karpathy's image "
                              "root (default: none: beside the manifest, Karpathy's json's folder)",
                              aliases=("--images",), group="data")


def to_manifest(cfg: ToManifestConfig) -> int:
    """Print the summary and write the manifest unless a problem blocks it (exit status 2)."""
    refuse_existing(Path(cfg.output_path), cfg.overwrite)
    plan = plan_manifest(cfg.images_path, cfg.captions_path, cfg.split or None, cfg.split_ratio or None, cfg.seed,
                         cfg.skip_missing)
    print(plan.report.text(), flush=True)
    if plan.blocking:
        print(f"error: {plan.blocking}", file=sys.stderr)
        return 2
    plan.write(cfg.output_path, cfg.overwrite)
    print(f"wrote {plural(len(plan.entries), 'image')} to {cfg.output_path}")
    return 0


def check(cfg: CheckConfig) -> int:
    """Print the summary; exit status 1 when image files are missing or an image has no caption."""
    report = check_dataset(cfg.captions_path, cfg.images_path or None)
    print(report.text())
    return 1 if report.severe else 0


COMMANDS: dict[str, tuple[type, Callable[..., int]]] = {
    "to-manifest": (ToManifestConfig, to_manifest),
    "check": (CheckConfig, check),
}


class _Parser(ArgumentParser):
    """utils.cli's parser (no abbreviations, did-you-mean) with this command's one-line 'error: ...' (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}{self.flag_hints(message)} ({self.command_parser().prog} --help)\n")


def build_parser() -> _Parser:
    parser = _Parser(prog="python -m data.captions", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{to-manifest,check}")
    for name, (cls, _) in COMMANDS.items():
        add_dataclass_flags(commands.add_parser(name, help=cls.__doc__, description=__doc__), cls,
                            exclusive=("split", "split_ratio"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``to-manifest`` converts a folder + captions file; ``check`` validates a dataset (see the module docstring).

    Exit status: 0 done, 1 check found missing images or images without captions, 2 an error (one line)."""
    args = build_parser().parse_args(argv)
    cls, run = COMMANDS[args.command]
    try:
        return run(cls(**dataclass_values(args, cls)))
    except (DatasetError, OSError) as exc:  # FileExistsError is an OSError
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
