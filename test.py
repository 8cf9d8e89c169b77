"""Evaluate a checkpoint on the val or test split with the COCO metrics, or caption a split / folder to a results json.

    python test.py --checkpoint runs/scst-e2e/best.pth --images_path coco/ --captions_path dataset_coco.json
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data.features import FeatureFileError, FeatureReader
from data.formats import CAPTIONS_PATH_HELP, load_records
from data.images import list_images
from data.loaders import ImageSource
from data.records import DatasetError, ImageRecord
from data.splits import split_records
from deploy.loading import LoadedModel, load_model
from engine.checkpoints import CheckpointError, backbone_weights_sha256, require_end_to_end
from engine.evaluate import caption_records, evaluation_report
from utils.cli import CheckpointOptions, LengthOptions, parse_dataclass, plain_warnings, resolve_max_len
from utils.dist import DistInfo, cleanup, init_distributed, launch
from utils.fields import option
from utils.runtime import RuntimeOptions, resolve_device

METRIC_NAMES = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


@dataclass(frozen=True)
class TestConfig(CheckpointOptions, LengthOptions, RuntimeOptions):
    """Every test.py setting (the checkpoint, length and runtime flags are shared with the other scripts)."""

    images_path: str = option("", "image folder (or, with --predictions_only, a plain folder of images)", group="data")
    features_path: str = option("", "evaluate on cached features instead of images", group="data")
    captions_path: str = option("", f"{CAPTIONS_PATH_HELP} (default: the one recorded in the checkpoint)",
                                group="data")
    split: str = option("test", "which split to evaluate", choices=("val", "test"), group="data")
    beam_sizes: tuple[int, ...] = option((5,), "beam width(s), e.g. 5 or [3,5]", flag="beam_size",
                                         aliases=("--eval_beam_sizes",), group="evaluation")
    metrics: tuple[str, ...] = option(("BLEU", "METEOR", "ROUGE_L", "CIDEr"), "metrics to compute (SPICE needs "
                                      "--spice_dir)", nargs="+", choices=METRIC_NAMES, group="evaluation")
    spice_dir: str = option("", "folder with the Stanford CoreNLP 3.6.0 jars, for SPICE", group="evaluation")
    results_json: str = option("", "COCO results file to write (default: in --output_dir)", group="evaluation")
    output_dir: str = option("", "where metrics and predictions go (default: beside the checkpoint)",
                             group="evaluation")
    predictions_only: bool = option(False, "caption the split (or a plain image folder) without scoring, for the "
                                    "COCO server", group="evaluation")
    overwrite: bool = option(False, "replace the metrics and prediction files of an earlier evaluation",
                             group="evaluation")
    batch_size: int = option(16, "images decoded together (halves on out-of-memory)", group="evaluation")
    num_gpus: int = option(1, "processes, each decoding a shard", group="runtime")
    ddp_sync_port: int = option(12355, "port of the process group", group="runtime")


def parse_config(argv: list[str] | None = None) -> TestConfig:
    # the seed's test command passes model flags: accepted and ignored, the checkpoint describes its own model
    legacy = ("--is_end_to_end", "--N_enc", "--N_dec", "--model_dim")
    cfg, p = parse_dataclass(TestConfig, argv, __doc__, ignored=legacy)
    if not cfg.images_path and not cfg.features_path:
        p.error("give --images_path (end-to-end checkpoint) or --features_path (cached features)")
    for name in ("images_path", "features_path", "captions_path", "vocab"):
        value = getattr(cfg, name)
        if value and not Path(value).exists():
            p.error(f"--{name} {value}: no such file or folder")
    missing = [c for c in cfg.checkpoint if not Path(c).exists()]
    if missing:
        p.error(f"--checkpoint {missing[0]}: no such file or folder")
    return cfg


def folder_records(folder: Path) -> list[ImageRecord]:
    """Every image of a plain folder; the id is the number in the file name (COCO style) when all have one."""
    files = list_images(folder)
    if not files:
        raise DatasetError(f"{folder}: no image files found")
    numbers = [re.findall(r"\d+", f.stem) for f in files]
    ids = [int(n[-1]) if n else -1 for n in numbers]
    if min(ids) < 0 or len(set(ids)) != len(ids):
        ids = list(range(len(files)))
    return [ImageRecord(i, f, (), "test") for i, f in zip(ids, files)]


def load_split(cfg: TestConfig, checkpoint: dict) -> list[ImageRecord]:
    """The split's records, or, with --predictions_only and a folder holding images, that folder's images."""
    folder = Path(cfg.images_path) if cfg.images_path else None
    if cfg.predictions_only and not cfg.captions_path and folder is not None and list_images(folder):
        print(f"captioning every image in {folder} (no references)")
        return folder_records(folder)
    captions = cfg.captions_path or checkpoint.get("train_config", {}).get("captions_path", "")
    if not captions:
        raise DatasetError("no captions file: pass --captions_path (or --predictions_only with an image folder)")
    records = split_records(load_records(captions, cfg.images_path or None))[cfg.split]
    if not records:
        raise DatasetError(f"{captions} has no {cfg.split} images")
    return records


def image_source(cfg: TestConfig, loaded: LoadedModel) -> ImageSource:
    """Cached features (checked against the model's width and backbone weights) or images preprocessed for its
    backbone (an ensemble's first member's; members that want other sizes are resized by the runtime)."""
    config = loaded.runtime.config
    if not cfg.features_path:
        require_end_to_end(config, loaded.sources[0], "caption images")
        return ImageSource(backbone=config.backbone)
    reader = FeatureReader(cfg.features_path)
    reader.check_matches(None, config.img_feature_dim)
    stored, ours = reader.attrs.get("weights_sha256"), backbone_weights_sha256(loaded.checkpoint)
    if stored and ours and stored != ours:
        print(f"warning: {cfg.features_path} was extracted with other backbone weights than those in "
              f"{loaded.sources[0]}; the scores describe those features, not this checkpoint's backbone",
              file=sys.stderr)
    return ImageSource(features=reader)


def output_paths(cfg: TestConfig, out_dir: Path, beam: int) -> tuple[Path, Path]:
    """(predictions, metrics) files of one beam size; earlier ones are kept unless --overwrite."""
    predictions = out_dir / f"predictions_{cfg.split}_beam{beam}.json"
    if cfg.results_json:
        predictions = Path(cfg.results_json)
        if len(cfg.beam_sizes) > 1:
            predictions = predictions.with_name(f"{predictions.stem}_beam{beam}{predictions.suffix}")
    metrics = out_dir / f"metrics_{cfg.split}_beam{beam}.json"
    existing = [p for p in (predictions, metrics) if p.exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{existing[0]} holds an earlier evaluation; pass --overwrite to replace it or "
                              "--output_dir / --results_json to write elsewhere")
    return predictions, metrics


def print_table(rows: list[dict]) -> None:
    names = [n for n in rows[0]["metrics"]]
    print("beam | " + " | ".join(f"{n:>8}" for n in names) + " | dangling | mean len | vocab")
    for r in rows:
        s = r["caption_stats"]
        print(f"{r['beam_size']:>4} | " + " | ".join(f"{r['metrics'][n]:8.2f}" for n in names)
              + f" | {100 * s['dangling_share']:7.1f}% | {s['mean_length']:8.2f} | {s['vocab_used']:5d}")
    for r in rows[:1]:
        for name, why in r["unavailable"].items():
            print(f"  {name} unavailable: {why}")
        if not r["official"]:
            print("  note: Java was unavailable, numbers use a pure-Python tokenizer and are not official")


def worker(cfg: TestConfig) -> list[dict]:
    dist = init_distributed(resolve_device(cfg.device).type, cfg.ddp_sync_port)
    try:
        return evaluate(cfg, dist)
    finally:
        cleanup()


def evaluate(cfg: TestConfig, dist: DistInfo) -> list[dict]:
    """Caption the split at every beam size; on the main process write predictions and metrics and print a table."""
    loaded = load_model(list(cfg.checkpoint), backend=cfg.backend, device=dist.device, precision=cfg.precision,
                        vocab=cfg.vocab or None, features_only=bool(cfg.features_path),
                        onnx_cache=cfg.onnx_cache or None, compile=cfg.compile)
    records = load_split(cfg, loaded.checkpoint)
    source = image_source(cfg, loaded)
    max_len = resolve_max_len(cfg, loaded.runtime.max_seq_len - 1)
    out_dir = Path(cfg.output_dir or Path(cfg.checkpoint[0]).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = loaded.runtime.weights()
    rows = []
    for beam in cfg.beam_sizes:
        paths = output_paths(cfg, out_dir, beam) if dist.is_main else None
        preds, skipped = caption_records(loaded.runtime, records, loaded.vocab, source, beam_size=beam,
                                         max_len=max_len, batch_size=cfg.batch_size, device=dist.device,
                                         rank=dist.rank, world=dist.world, num_workers=cfg.num_workers,
                                         desc=f"{cfg.split} beam {beam}")
        if not dist.is_main:
            continue
        if not preds:
            raise DatasetError(f"none of the {len(records)} images could be read (e.g. {records[0].path}); check "
                               "--images_path")
        results_path, metrics_path = paths
        by_id = {r.image_id: r for r in records}
        results = [{"image_id": i, "caption": preds[i], **({"file_name": by_id[i].path.name}
                                                            if cfg.predictions_only else {})} for i in sorted(preds)]
        results_path.write_text(json.dumps(results, indent=1))
        print(f"wrote {len(results)} captions to {results_path}" + (f" ({len(skipped)} unreadable images skipped)"
                                                                     if skipped else ""))
        if cfg.predictions_only:
            continue
        report = evaluation_report(preds, records, cfg.metrics, cfg.spice_dir or None)
        row = {"checkpoint": [str(c) for c in cfg.checkpoint], "weights_sha256": weights["weights_sha256"],
               "backend": loaded.runtime.kind, "split": cfg.split,
               "beam_size": beam, "max_len": max_len, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "skipped_images": skipped, "predictions": str(results_path), **report}
        metrics_path.write_text(json.dumps(row, indent=1))
        rows.append(row)
    if rows:
        print_table(rows)
    return rows


def main(cfg: TestConfig) -> list[dict]:
    return launch(worker, cfg, cfg.num_gpus, cfg.ddp_sync_port) or []


if __name__ == "__main__":
    plain_warnings()
    try:
        main(parse_config())
    except (CheckpointError, DatasetError, FeatureFileError, FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
