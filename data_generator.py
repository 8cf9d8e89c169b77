"""Cache backbone features of every image of a dataset in one HDF5 file (phases 1 and 4 of the recipe).

The backbone comes from a Microsoft or timm Swin file (phase 1), one of our end-to-end checkpoints (phase 4, its
backbone part), or a backbone file of this project. Killed half-way, the same command continues where it stopped.
Under torchrun (one process per GPU, any number of machines) each process writes a shard and rank 0 joins them into
the same one file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data.records import DatasetError
from deploy.checkpoints import CheckpointError
from engine.features import GeneratorConfig, extract_features
from utils.cli import parse_dataclass, plain_warnings


def parse_config(argv: list[str] | None = None) -> GeneratorConfig:
    cfg, p = parse_dataclass(GeneratorConfig, argv, __doc__)
    if cfg.batch_size < 1:
        p.error("--batch_size must be at least 1")
    for name in ("backbone", "images_path", "captions_path"):
        if not Path(getattr(cfg, name)).exists():
            p.error(f"--{name} {getattr(cfg, name)}: no such file or folder")
    return cfg


def main(cfg: GeneratorConfig) -> Path:
    return extract_features(cfg)


if __name__ == "__main__":
    plain_warnings()
    try:
        main(parse_config())
    except (CheckpointError, DatasetError, FileExistsError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
