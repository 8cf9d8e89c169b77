"""Evaluate a checkpoint on the val or test split with the COCO metrics, or caption a split / folder to a results json.

    python test.py --checkpoint runs/scst-e2e/best.pth --images_path coco/ --captions_path dataset_coco.json

Every input is checked before a model loads. Data not given is the data the checkpoint's training run recorded (named
when used). Decoding is fp32 on every device unless asked otherwise, so the scores compare with the reference's; each
metrics and predictions file records the weights, backend, precision, beam size, length cap and split it measured.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from data.features import FeatureFileError, FeatureReader
from data.formats import CAPTIONS_PATH_HELP, load_records
from data.images import list_images
from data.loaders import ImageSource
from data.records import DatasetError, ImageRecord
from data.splits import split_records
from deploy.checkpoints import CheckpointError, backbone_weights_sha256, require_end_to_end
from deploy.loading import LoadedModel, load_model
from engine.evaluate import EVAL_PRECISION, caption_records, decoding_record, evaluation_report, prediction_rows
from models.config import ModelConfig
from utils.cli import CheckpointOptions, LengthOptions, parse_dataclass, plain_warnings, resolve_max_len, str2bool
from utils.dist import DistInfo, launch, process_group
from utils.fields import option
from utils.runtime import RuntimeOptions, precision_name, resolve_device

METRIC_NAMES = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


@dataclass(frozen=True)
class TestConfig(CheckpointOptions, LengthOptions, RuntimeOptions):
    """Every test.py setting (the checkpoint, length and runtime flags are shared with the other scripts)."""

    images_path: str = option("", "image folder (or, with --predictions_only, a plain folder of images; default: the "
                              "one the checkpoint's training run recorded)", group="data")
    features_path: str = option("", "evaluate on cached features instead of images (default: the file the "
                                "checkpoint's training run recorded, with --is_end_to_end False)", group="data")
    captions_path: str = option("", f"{CAPTIONS_PATH_HELP} (default: the one recorded in the checkpoint)",
                                group="data")
    split: str = option("test", "which split to evaluate", choices=("val", "test"), group="data")
    is_end_to_end: bool | None = option(None, "evaluate images (True) or cached features (False): without "
                                        "--images_path or --features_path, which of the data the checkpoint's "
                                        "training run recorded to use (default: what that run read)",
                                        parse=str2bool, group="data")
    is_ensemble: bool = option(False, "the reference's ensemble: every .pth file of the --checkpoint folder (several "
                               "--checkpoint paths make one too)", group="model")
    beam_sizes: tuple[int, ...] = option((5,), "beam width(s), e.g. 5 or [3,5]", flag="beam_size",
                                         aliases=("--eval_beam_sizes",), group="evaluation")
    metrics: tuple[str, ...] = option(("BLEU", "METEOR", "ROUGE_L", "CIDEr"), "metrics to compute (SPICE needs "
                                      "--spice_dir)", nargs="+", choices=METRIC_NAMES, group="evaluation")
    spice_dir: str = option("", "folder with the Stanford CoreNLP 3.6.0 jars, for SPICE", group="evaluation")
    results_json: str = option("", "COCO results file to write (default: in --output_path)", group="evaluation")
    output_path: str = option("", "folder where metrics and predictions go (default: beside the checkpoint)",
                              aliases=("--output_dir",), group="evaluation")
    predictions_only: bool = option(False, "caption the split (or a plain image folder) without scoring, for the "
                                    "COCO server", group="evaluation")
    show_predictions: bool = option(False, "also write each caption with its references as text, "
                                    "predictions_<split>_beam<k>.txt (the reference's predictions.txt)",
                                    group="evaluation")
    overwrite: bool = option(False, "replace the metrics and prediction files of an earlier evaluation",
                             group="evaluation")
    batch_size: int = option(16, "images decoded together (halves on out-of-memory)",
                             aliases=("--eval_parallel_batch_size",), group="evaluation")
    precision: str = option(EVAL_PRECISION, "autocast precision: fp32 on every device unless asked (bf16 changes "
                            "captions, so scores would not compare with the reference's), bf16, fp16 or auto (bf16 on "
                            "a GPU); --amp is an alias (--amp none = fp32)", aliases=("--amp",), parse=precision_name,
                            group="runtime")
    num_gpus: int = option(1, "processes, each decoding a shard", group="runtime")
    ddp_sync_port: int = option(12355, "port of the process group", group="runtime")


def parse_config(argv: list[str] | None = None) -> TestConfig:
    """The command line's settings; each flag's own value is checked here, the inputs together by check_inputs."""
    # the seed's test command passes model flags: accepted and ignored, the checkpoint describes its own model
    cfg, p = parse_dataclass(TestConfig, argv, __doc__, ignored=("--N_enc", "--N_dec", "--model_dim"))
    for name in ("images_path", "features_path", "captions_path", "vocab", "spice_dir"):
        value = getattr(cfg, name)
        if value and not Path(value).exists():
            p.error(f"--{name} {value}: no such file or folder")
    missing = [c for c in cfg.checkpoint if not Path(c).exists()]
    if missing:
        p.error(f"--checkpoint {missing[0]}: no such file or folder")
    for name in ("batch_size", "num_gpus"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name} must be at least 1")
    if cfg.is_end_to_end is True and cfg.features_path and not cfg.images_path:
        p.error("--is_end_to_end True evaluates images, but only --features_path was given; give --images_path")
    if cfg.is_end_to_end is False and cfg.images_path and not cfg.features_path:
        p.error("--is_end_to_end False evaluates cached features, but only --images_path was given; give "
                "--features_path")
    return cfg


@dataclass(frozen=True)
class EvaluationPlan:
    """What test.py evaluates, decided and checked before any model loads: the settings with the data paths and
    ensemble members filled in, and the records of the split (or folder)."""

    cfg: TestConfig
    records: list[ImageRecord]
    split_size: int  # the split's images, those without image file or features included


def say(message: str) -> None:
    """Print on the first process only (torchrun starts main in every process)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def ensemble_members(cfg: TestConfig) -> tuple[str, ...]:
    """--checkpoint as given, or with --is_ensemble True and one folder, every .pth file in it (as the reference)."""
    if not cfg.is_ensemble or len(cfg.checkpoint) > 1:
        return cfg.checkpoint
    folder = Path(cfg.checkpoint[0])
    if not folder.is_dir():
        raise ValueError(f"--is_ensemble True averages every .pth file of a folder, but {folder} is a file; give its "
                         "folder, or several --checkpoint paths")
    members = tuple(str(p) for p in sorted(folder.glob("*.pth")))
    if not members:
        raise ValueError(f"--is_ensemble True: {folder} holds no .pth file")
    say(f"ensemble of the {len(members)} .pth files in {folder}: {', '.join(Path(m).name for m in members)}")
    return members


def recorded_facts(source: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(what the source's training run recorded: train_config, ...; its model config, None when unknown), read
    without its weights: a model or ONNX folder's config.json, or a checkpoint memory-mapped, not loaded."""
    if source.is_dir():
        manifest = source / "config.json"
        if not manifest.is_file():
            return {}, None  # not a model folder: loading says so
        try:
            facts = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}, None  # loading says what is wrong with it
        return facts.get("training") or {}, facts.get("model_config")
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, OSError, EOFError):
        return {}, None  # torch cannot memory-map it (the older, non-zip format): nothing recorded; loading reads it
    if not isinstance(ckpt, dict):
        return {}, None
    return {k: ckpt[k] for k in ("phase", "train_config") if k in ckpt}, ckpt.get("model_config")


def model_config_of(recorded: dict[str, Any] | None) -> ModelConfig | None:
    """The recorded model config, or None when there is none or it cannot be read (loading then says why)."""
    try:
        return ModelConfig.from_dict(recorded) if recorded else None
    except (ValueError, KeyError, TypeError):
        return None


def data_paths(cfg: TestConfig, train_config: dict[str, Any], source: str) -> dict[str, str]:
    """{"images_path" or "features_path": path}: nothing when either was given, else the one the checkpoint's training
    run recorded (--is_end_to_end picks which, by default what that run read), said so; a clear error when it
    recorded none or the path does not exist here."""
    if cfg.images_path or cfg.features_path:
        return {}
    if not train_config:
        raise ValueError(f"give --images_path (end-to-end checkpoint) or --features_path (cached features): {source} "
                         "records no training run to take them from")
    images = cfg.is_end_to_end if cfg.is_end_to_end is not None else bool(train_config.get("is_end_to_end"))
    name, what = ("images_path", "image folder") if images else ("features_path", "feature file")
    path = train_config.get(name) or ""
    other = train_config.get("features_path" if images else "images_path") or ""
    if not path:
        read = f" (it read {'cached features' if images else 'images'} from {other})" if other else ""
        raise ValueError(f"{source}'s training run recorded no {what}{read}: give --{name}"
                         + (f", or --is_end_to_end {not images} to use {other}" if other else ""))
    if not Path(path).exists():
        raise ValueError(f"the {what} {source}'s training run recorded, {path}, does not exist here: give --{name}")
    say(f"{what}: {path} (recorded by {source}'s training run; --{name} chooses another)")
    return {name: path}


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


def load_split(cfg: TestConfig, train_config: dict[str, Any], features: FeatureReader | None) -> list[ImageRecord]:
    """The split's records, or, with --predictions_only and a folder holding images, that folder's images; the
    captions file is --captions_path, else the one the checkpoint's training run recorded, else the feature file's
    (either said so)."""
    folder = Path(cfg.images_path) if cfg.images_path else None
    if cfg.predictions_only and not cfg.captions_path and folder is not None and list_images(folder):
        say(f"captioning every image in {folder} (no references)")
        return folder_records(folder)
    captions = cfg.captions_path
    for recorder, recorded in ((f"{cfg.checkpoint[0]}'s training run", train_config.get("captions_path")),
                               (cfg.features_path, features.attrs.get("captions_path") if features else None)):
        if not captions and recorded:
            captions = str(recorded)
            say(f"captions: {captions} (recorded by {recorder}; --captions_path chooses another)")
    if not captions:
        raise DatasetError("no captions file: pass --captions_path (or --predictions_only with an image folder)")
    if not Path(captions).exists():
        raise DatasetError(f"the captions file {captions} does not exist here: give --captions_path")
    records = split_records(load_records(captions, cfg.images_path or None))[cfg.split]
    if not records:
        raise DatasetError(f"{captions} has no {cfg.split} images")
    return records


def present_records(cfg: TestConfig, records: list[ImageRecord], features: FeatureReader | None) -> list[ImageRecord]:
    """The records whose image file (or cached features) exists; refuses a split with none, warns about the others."""
    if features is not None:
        kept = features.keep_present(records)
        if not kept:
            raise FeatureFileError(f"{cfg.features_path} holds none of the {len(records)} {cfg.split} images")
        return kept
    missing = [r for r in records if not r.path.is_file()]
    if len(missing) == len(records):
        raise DatasetError(f"none of the {len(records)} {cfg.split} images exists (e.g. {records[0].path}); check "
                           "--images_path")
    if missing:
        say(f"warning: {len(missing)} of the {len(records)} {cfg.split} images do not exist (e.g. {missing[0].path}) "
            "and are skipped")
    return records


def check_inputs(cfg: TestConfig) -> EvaluationPlan:
    """Decide and check every input (checkpoints, data, captions, split, output files, flags) without loading a
    model: a mistake costs no model load (tens of seconds and gigabytes for the seed's model)."""
    resolve_device(cfg.device)
    cfg = replace(cfg, checkpoint=ensemble_members(cfg))
    facts, model_config = recorded_facts(Path(cfg.checkpoint[0]))
    train_config = facts.get("train_config") or {}
    cfg = replace(cfg, **data_paths(cfg, train_config, cfg.checkpoint[0]))
    config = model_config_of(model_config)
    resolve_max_len(cfg, config.max_seq_len - 1 if config else 1)
    features = FeatureReader(cfg.features_path) if cfg.features_path else None
    if config is not None and features is not None:
        features.check_matches(None, config.img_feature_dim)
    if config is not None and features is None:
        require_end_to_end(config, cfg.checkpoint[0], "caption images")
    records = load_split(cfg, train_config, features)
    for beam in cfg.beam_sizes:
        output_paths(cfg, output_dir(cfg), beam)
    return EvaluationPlan(cfg, present_records(cfg, records, features), len(records))


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


def output_dir(cfg: TestConfig) -> Path:
    return Path(cfg.output_path or Path(cfg.checkpoint[0]).parent)


def output_paths(cfg: TestConfig, out_dir: Path, beam: int) -> dict[str, Path]:
    """{"predictions", "metrics"[, "text"]} files of one beam size; earlier ones are kept unless --overwrite."""
    predictions = out_dir / f"predictions_{cfg.split}_beam{beam}.json"
    if cfg.results_json:
        predictions = Path(cfg.results_json)
        if len(cfg.beam_sizes) > 1:
            predictions = predictions.with_name(f"{predictions.stem}_beam{beam}{predictions.suffix}")
    paths = {"predictions": predictions, "metrics": out_dir / f"metrics_{cfg.split}_beam{beam}.json"}
    if cfg.show_predictions:
        paths["text"] = predictions.with_suffix(".txt")
    existing = [p for p in paths.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{existing[0]} holds an earlier evaluation; pass --overwrite to replace it or "
                              "--output_path / --results_json to write elsewhere")
    return paths


def predictions_text(predictions: dict[int, str], records: list[ImageRecord]) -> str:
    """Each image's caption and references, one block per image (the reference's --show_predictions)."""
    lines = []
    for r in records:
        if r.image_id in predictions:
            lines += [f"{r.image_id} {r.path.name}: {predictions[r.image_id]}", *(f"    ref: {c}" for c in r.captions)]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict]) -> None:
    first = rows[0]
    print(f"{first['split']} split, {first['num_images']} of {first['split_size']} images, {first['precision']} on "
          f"{first['backend']}, at most {first['max_len']} tokens, weights {first['weights_sha256'][:12]}")
    names = [n for n in first["metrics"]]
    print("beam | " + " | ".join(f"{n:>8}" for n in names) + " | dangling | mean len | vocab")
    for r in rows:
        s = r["caption_stats"]
        print(f"{r['beam_size']:>4} | " + " | ".join(f"{r['metrics'][n]:8.2f}" for n in names)
              + f" | {100 * s['dangling_share']:7.1f}% | {s['mean_length']:8.2f} | {s['vocab_used']:5d}")
    for name, why in first["unavailable"].items():
        print(f"  {name} unavailable: {why}")
    if not first["official"]:
        print("  note: Java was unavailable, numbers use a pure-Python tokenizer and are not official")


def worker(plan: EvaluationPlan) -> list[dict]:
    with process_group(resolve_device(plan.cfg.device).type, plan.cfg.ddp_sync_port) as (dist, _):
        return evaluate(plan, dist)


def evaluate(plan: EvaluationPlan, dist: DistInfo) -> list[dict]:
    """Caption the split at every beam size; on the main process write predictions and metrics and print a table."""
    cfg, records = plan.cfg, plan.records
    loaded = load_model(list(cfg.checkpoint), backend=cfg.backend, device=dist.device, precision=cfg.precision,
                        vocab=cfg.vocab or None, features_only=bool(cfg.features_path),
                        onnx_cache=cfg.onnx_cache or None, compile=cfg.compile)
    source = image_source(cfg, loaded)
    max_len = resolve_max_len(cfg, loaded.runtime.max_seq_len - 1)
    out_dir = output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for beam in cfg.beam_sizes:
        paths = output_paths(cfg, out_dir, beam) if dist.is_main else {}
        preds, skipped = caption_records(loaded.runtime, records, loaded.vocab, source, beam_size=beam,
                                         max_len=max_len, batch_size=cfg.batch_size, device=dist.device,
                                         rank=dist.rank, world=dist.world, num_workers=cfg.num_workers,
                                         desc=f"{cfg.split} beam {beam}")
        if not dist.is_main:
            continue
        if not preds:
            raise DatasetError(f"none of the {len(records)} images could be read (e.g. {records[0].path}); check "
                               "--images_path")
        measured = decoding_record(loaded.runtime, beam_size=beam, max_len=max_len, split=cfg.split,
                                   split_size=plan.split_size)
        names = {r.image_id: r.path.name for r in records} if cfg.predictions_only else None
        paths["predictions"].write_text(json.dumps(prediction_rows(preds, measured, names), indent=1))
        print(f"wrote {len(preds)} captions to {paths['predictions']}" + (f" ({len(skipped)} unreadable images "
                                                                         "skipped)" if skipped else ""))
        if "text" in paths:
            paths["text"].write_text(predictions_text(preds, records))
            print(f"wrote them with their references to {paths['text']}")
        if cfg.predictions_only:
            continue
        report = evaluation_report(preds, records, cfg.metrics, cfg.spice_dir or None)
        row = {"checkpoint": [str(c) for c in cfg.checkpoint], **measured,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped_images": skipped,
               "predictions": str(paths["predictions"]), **report}
        paths["metrics"].write_text(json.dumps(row, indent=1))
        rows.append(row)
    if rows:
        print_table(rows)
    return rows


def main(cfg: TestConfig) -> list[dict]:
    plan = check_inputs(cfg)
    return launch(worker, plan, plan.cfg.num_gpus, plan.cfg.ddp_sync_port) or []


if __name__ == "__main__":
    plain_warnings()
    try:
        main(parse_config())
    except (CheckpointError, DatasetError, FeatureFileError, FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
