"""Evaluate a checkpoint on the val or test split with the COCO metrics, or caption a split / folder to a results json.

    python test.py --save_model_path runs/scst-e2e/best.pth --images_path coco/ --captions_path dataset_coco.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.captions import DatasetError, ImageRecord, load_records, split_records
from data.features import FeatureFileError, FeatureReader
from data.images import list_images
from data.loaders import ImageSource
from engine.checkpoints import CheckpointError, restore_model
from engine.evaluate import caption_records, evaluation_report
from utils.checkpoint import file_sha256
from utils.cli import int_list, str2bool
from utils.dist import cleanup, init_distributed, launch
from utils.runtime import resolve_precision

METRIC_NAMES = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


@dataclass(frozen=True)
class TestConfig:
    save_model_path: str
    vocab: str
    images_path: str
    features_path: str
    captions_path: str
    split: str
    eval_beam_sizes: tuple[int, ...]
    metrics: tuple[str, ...]
    spice_dir: str
    results_json: str
    output_dir: str
    predictions_only: bool
    batch_size: int
    max_len: int
    num_gpus: int
    ddp_sync_port: int
    device: str
    precision: str
    num_workers: int
    is_end_to_end: bool | None


def parse_config(argv: list[str] | None = None) -> TestConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--save_model_path", required=True, help="checkpoint to evaluate (ours, or official + --vocab)")
    p.add_argument("--vocab", default="", help="vocabulary pickle/JSON for the official checkpoint")
    p.add_argument("--images_path", default="", help="image folder (or, with --predictions_only, a plain folder)")
    p.add_argument("--features_path", default="", help="evaluate on cached features instead of images")
    p.add_argument("--captions_path", default="",
                   help="Karpathy json or manifest (default: the one recorded in the checkpoint)")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--eval_beam_sizes", type=int_list, default=(5,), help="e.g. [5] or 3,5")
    p.add_argument("--metrics", nargs="+", default=["BLEU", "METEOR", "ROUGE_L", "CIDEr"],
                   help=f"any of {METRIC_NAMES} (SPICE needs --spice_dir)")
    p.add_argument("--spice_dir", default="", help="folder with Stanford CoreNLP 3.6.0 jars, for SPICE")
    p.add_argument("--results_json", default="", help="COCO results file to write (default: in --output_dir)")
    p.add_argument("--output_dir", default="", help="where metrics and predictions go (default: beside the ckpt)")
    p.add_argument("--predictions_only", action="store_true",
                   help="caption the split (or a plain image folder) without scoring, for the COCO server")
    p.add_argument("--batch_size", type=int, default=16, help="images decoded together (halves on OOM)")
    p.add_argument("--max_len", type=int, default=20, help="maximum generated tokens")
    p.add_argument("--num_gpus", type=int, default=1, help="processes, each decoding a shard")
    p.add_argument("--ddp_sync_port", type=int, default=12355)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--is_end_to_end", type=str2bool, default=None,
                   help="accepted for the seed's command; images are used unless --features_path is given")
    for legacy in ("--N_enc", "--N_dec", "--model_dim"):
        p.add_argument(legacy, type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    unknown = [m for m in a.metrics if m not in METRIC_NAMES]
    if unknown:
        p.error(f"--metrics: unknown {unknown}; choose from {METRIC_NAMES}")
    if not a.images_path and not a.features_path:
        p.error("give --images_path (end-to-end checkpoint) or --features_path (cached features)")
    for name in ("save_model_path", "images_path", "features_path", "captions_path", "vocab"):
        value = getattr(a, name)
        if value and not Path(value).exists():
            p.error(f"--{name} {value}: no such file or folder")
    return TestConfig(a.save_model_path, a.vocab, a.images_path, a.features_path, a.captions_path, a.split,
                      a.eval_beam_sizes, tuple(a.metrics), a.spice_dir, a.results_json, a.output_dir,
                      a.predictions_only, a.batch_size, a.max_len, a.num_gpus, a.ddp_sync_port, a.device, a.precision,
                      a.num_workers, a.is_end_to_end)


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
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else \
        torch.device(cfg.device).type
    dist = init_distributed(device_type, cfg.ddp_sync_port)
    try:
        return _evaluate(cfg, dist)
    finally:
        cleanup()


def _evaluate(cfg: TestConfig, dist) -> list[dict]:
    restored = restore_model(cfg.save_model_path, vocab_path=cfg.vocab or None,
                             features_only=bool(cfg.features_path))
    model = restored.model.to(dist.device).eval()
    records = load_split(cfg, restored.checkpoint)
    if cfg.features_path:
        reader = FeatureReader(cfg.features_path)
        reader.check_matches(None, restored.config.img_feature_dim)
        source = ImageSource(features=reader)
    else:
        if restored.config.backbone is None:
            raise CheckpointError(f"{cfg.save_model_path} is a features-only model: evaluate it with --features_path")
        bb = restored.config.backbone
        source = ImageSource(img_size=bb.img_size, mean=bb.mean, std=bb.std)
    precision = resolve_precision(cfg.precision, dist.device)
    out_dir = Path(cfg.output_dir or Path(cfg.save_model_path).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_hash = file_sha256(cfg.save_model_path) if dist.is_main else ""
    rows = []
    for beam in cfg.eval_beam_sizes:
        preds, skipped = caption_records(model, records, restored.vocab, source, beam_size=beam, max_len=cfg.max_len,
                                         batch_size=cfg.batch_size, device=dist.device, precision=precision,
                                         rank=dist.rank, world=dist.world, num_workers=cfg.num_workers,
                                         desc=f"{cfg.split} beam {beam}")
        if not dist.is_main:
            continue
        if not preds:
            raise DatasetError(f"none of the {len(records)} images could be read (e.g. {records[0].path}); check "
                               "--images_path")
        by_id = {r.image_id: r for r in records}
        results = [{"image_id": i, "caption": preds[i], **({"file_name": by_id[i].path.name}
                                                            if cfg.predictions_only else {})} for i in sorted(preds)]
        results_path = Path(cfg.results_json) if cfg.results_json else \
            out_dir / f"predictions_{cfg.split}_beam{beam}.json"
        if cfg.results_json and len(cfg.eval_beam_sizes) > 1:
            results_path = results_path.with_name(f"{results_path.stem}_beam{beam}{results_path.suffix}")
        results_path.write_text(json.dumps(results, indent=1))
        print(f"wrote {len(results)} captions to {results_path}" + (f" ({len(skipped)} unreadable images skipped)"
                                                                     if skipped else ""))
        if cfg.predictions_only:
            continue
        report = evaluation_report(preds, records, cfg.metrics, cfg.spice_dir or None)
        row = {"checkpoint": str(cfg.save_model_path), "checkpoint_sha256": ckpt_hash, "split": cfg.split,
               "beam_size": beam, "max_len": cfg.max_len, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "skipped_images": skipped, "predictions": str(results_path), **report}
        metrics_path = out_dir / f"metrics_{cfg.split}_beam{beam}.json"
        metrics_path.write_text(json.dumps(row, indent=1))
        rows.append(row)
    if rows:
        print_table(rows)
    return rows


def main(cfg: TestConfig) -> list[dict]:
    return launch(worker, cfg, cfg.num_gpus, cfg.ddp_sync_port) or []


if __name__ == "__main__":
    try:
        main(parse_config())
    except (CheckpointError, DatasetError, FeatureFileError) as e:
        sys.exit(f"error: {e}")
