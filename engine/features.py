"""Feature extraction (phases 1 and 4): every image of a dataset through the backbone into one HDF5 file.

data_generator.py is its command line. Unreadable images are recorded as invalid rows; when more than
`max_unreadable` of the images are missing or unreadable the run fails with one summary line instead of writing a
file of invalid rows.

Under torchrun (WORLD_SIZE > 1, any number of machines sharing the output's filesystem) each process extracts one
contiguous shard of the images, cut at batch boundaries so every backbone call sees the same images as in one
process, into its own resumable file next to the output (`features.hdf5.rank3-of-8`); once every shard is complete
the main process joins them, chunk by chunk, into the one file a single process would have written, and removes them.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.features import (
    FeatureFileError,
    FeatureWriter,
    check_disk_space_for_shards,
    join_feature_shards,
    join_partial_path,
    leftover_files,
    partial_path,
    required_bytes,
    same_job,
    shard_path,
)
from data.formats import CAPTIONS_PATH_HELP, load_records
from data.images import ImageLoadError, load_image_tensor
from data.records import DatasetError, ImageRecord, missing_image_message
from deploy.checkpoints import read_backbone_file
from models.backbone import backbone_output_shape, backbone_tokens, create_backbone, load_backbone_state_dict
from models.config import BackboneConfig
from utils.checkpoint import state_dict_sha256
from utils.dist import DistInfo, all_gather_objects, process_group
from utils.fields import option
from utils.runtime import RuntimeOptions, autocast, resolve_device, resolve_precision


@dataclass(frozen=True)
class GeneratorConfig(RuntimeOptions):
    """Every data_generator.py setting (device, precision and workers are shared with the other scripts)."""

    backbone: str = option("", "backbone weights: a Microsoft/timm Swin .pth, a backbone file of this project, or an "
                           "end-to-end checkpoint of ours (phase 4)", aliases=("--save_model_path",), required=True,
                           group="model")
    img_size: int = option(0, "input side in pixels (0: the backbone's own, 384 for COCO)", group="model")
    output_path: str = option("", "HDF5 file to write", required=True, group="data")
    images_path: str = option("", "image folder (Karpathy filepath/filename live under it)", required=True,
                              group="data")
    captions_path: str = option("", CAPTIONS_PATH_HELP, required=True,
                                group="data")
    dtype: str = option("fp16", "stored precision (fp16 halves the size)", choices=("fp16", "fp32"), group="data")
    overwrite: bool = option(False, "replace an existing complete file", group="data")
    batch_size: int = option(32, "images per backbone call", group="runtime")
    max_unreadable: float = option(0.05, "largest share of missing or unreadable images tolerated; above it the "
                                   "command fails (usually a wrong --images_path)", group="data")


class _Images(Dataset):
    """(tensor, error) per record; an unreadable image becomes zeros with its error message."""

    def __init__(self, records: list[ImageRecord], bb: BackboneConfig) -> None:
        self.records, self.bb = records, bb

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        r = self.records[i]
        try:
            return load_image_tensor(r.path, self.bb.img_size, self.bb.mean, self.bb.std, name=str(r.path)), ""
        except (ImageLoadError, OSError) as e:
            return torch.zeros(3, self.bb.img_size, self.bb.img_size), str(e) or f"{r.path}: unreadable"


def check_images_present(records: list[ImageRecord], max_unreadable: float, images_path: str) -> None:
    """Fail before any work when too many image files are missing (a wrong --images_path, typically)."""
    missing = [r for r in records if not r.path.is_file()]
    if len(missing) > max_unreadable * len(records):
        raise DatasetError(f"{len(missing)} of {len(records)} image files do not exist (e.g. "
                           f"{missing_image_message(missing[0])}); check --images_path {images_path} (a manifest's "
                           "relative paths are looked up there first, then beside the manifest)")


def load_backbone(cfg: GeneratorConfig) -> tuple[torch.nn.Module, BackboneConfig]:
    """The backbone of --backbone at --img_size, weights loaded, in eval mode."""
    bb, state = read_backbone_file(cfg.backbone, img_size=cfg.img_size or None)
    if cfg.img_size:
        bb = BackboneConfig.from_dict({**bb.to_dict(), "img_size": cfg.img_size})
    backbone = create_backbone(bb)
    load_backbone_state_dict(backbone, state, cfg.backbone)
    return backbone.eval(), bb


def _job_attrs(cfg: GeneratorConfig, backbone: torch.nn.Module, bb: BackboneConfig) -> dict:
    return {"backbone_name": bb.name, "backbone_config": bb.to_dict(), "weights_sha256": state_dict_sha256(
        backbone.state_dict()), "img_size": bb.img_size, "source_checkpoint": str(Path(cfg.backbone).resolve()),
        "captions_path": str(Path(cfg.captions_path).resolve()), "images_path": str(Path(cfg.images_path).resolve()),
        "batch_size": cfg.batch_size}


class Job(NamedTuple):
    """What every process of an extraction starts from."""

    records: list[ImageRecord]
    backbone: torch.nn.Module  # on its device, weights loaded
    config: BackboneConfig
    tokens: int
    channels: int
    attrs: dict  # what the feature file records about the job


def prepare_job(cfg: GeneratorConfig, device: torch.device) -> Job:
    """The records (checked present), the backbone and the output's shape of an extraction."""
    records = load_records(cfg.captions_path, cfg.images_path)
    check_images_present(records, cfg.max_unreadable, cfg.images_path)
    backbone, bb = load_backbone(cfg)
    backbone.to(device)
    return Job(records, backbone, bb, *backbone_output_shape(bb), _job_attrs(cfg, backbone, bb))


def extract_features(cfg: GeneratorConfig) -> Path:
    """Write (or finish) the feature file of cfg; returns its path. Under torchrun, this process's shard, joined
    with the others' by the main process (every process returns once the file is in place)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        with process_group(resolve_device(cfg.device).type) as (info, group):
            return _extract_sharded(cfg, info, group)
    device = resolve_device(cfg.device)
    records, backbone, bb, tokens, channels, attrs = prepare_job(cfg, device)
    precision = resolve_precision(cfg.precision, device)
    for p in leftover_files(cfg.output_path, 1):
        warnings.warn(f"{p} is left by an interrupted run with several processes: rerun with that many processes "
                      "to finish it, or delete it", stacklevel=2)
    size = required_bytes(len(records), tokens, channels, cfg.dtype)
    print(f"{len(records)} images -> {cfg.output_path}: ({len(records)}, {tokens}, {channels}) {cfg.dtype}, "
          f"{size / 1e9:.2f} GB; backbone {bb.name} at {bb.img_size}px on {device} ({precision})", flush=True)
    writer = FeatureWriter(cfg.output_path, [r.image_id for r in records], tokens, channels, cfg.dtype, attrs,
                           overwrite=cfg.overwrite)
    try:
        if writer.num_written:
            print(f"resuming after {writer.num_written} images already written", flush=True)
        errors = _extract(backbone, _Images(records[writer.num_written:], bb), writer, cfg, device, precision)
        writer.finish()
    finally:
        writer.close()
    _report_unreadable(errors, len(records), cfg.max_unreadable)
    print(f"wrote {cfg.output_path}", flush=True)
    return Path(cfg.output_path)


def _extract(backbone: torch.nn.Module, images: _Images, writer: FeatureWriter, cfg: GeneratorConfig,
             device: torch.device, precision: str, desc: str = "features", progress: bool = True) -> list[str]:
    """Run the images through the backbone in batches, appending to writer; returns the unreadable images' errors."""
    loader = DataLoader(images, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    bar = tqdm(total=writer.total, initial=writer.num_written, unit="img", desc=desc, dynamic_ncols=True,
               disable=not progress)
    t0, done, errors = time.perf_counter(), 0, []
    with torch.inference_mode():
        for pixels, batch_errors in loader:
            with autocast(device, precision):
                feats = backbone_tokens(backbone, pixels.to(device, non_blocking=True))
            writer.append(feats.float().cpu().numpy(), np.array([not e for e in batch_errors]))
            errors += [e for e in batch_errors if e]
            done += len(pixels)
            bar.update(len(pixels))
            bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.1f}")
    bar.close()
    return errors


def _report_unreadable(errors: list[str], total: int, max_unreadable: float) -> None:
    """One summary line for unreadable images; an error when they are more than max_unreadable of the total."""
    if errors:
        _unreadable_verdict(len(errors), errors[0], total, max_unreadable)


def _unreadable_verdict(count: int, example: str, total: int, max_unreadable: float, show: bool = True) -> None:
    summary = (f"{count} of {total} images could not be read and are marked invalid in the file (training "
               f"skips them), e.g. {example}")
    if count > max_unreadable * total:
        raise DatasetError(summary + f"; that is more than --max_unreadable {max_unreadable:g} of the images")
    if show:
        print(f"warning: {summary}", flush=True)


def shard_ranges(num_images: int, world: int, batch_size: int) -> list[tuple[int, int]]:
    """Each process's contiguous [start, stop) of the images: whole batches, as even as they divide (the last
    process's may end on the final partial batch; a process may get none when there are fewer batches than
    processes). Cutting at batch boundaries keeps every backbone call the same as in a single process."""
    batches = -(-num_images // batch_size)
    cuts = [min(num_images, (r * batches // world) * batch_size) for r in range(world + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _agree(error: BaseException | None, group) -> None:
    """Raise on every process the first error any process met (so none waits for a peer that gave up)."""
    first = next((e for e in all_gather_objects(error, group) if e is not None), None)
    if first is not None:
        raise first


def _prepare_shards(cfg: GeneratorConfig, meta: dict, ids: list[int], ranges: list[tuple[int, int]],
                    tokens: int, channels: int) -> None:
    """The main process's checks before any shard is written: no complete file (unless --overwrite), no files of
    a run with another number of processes, shards of this run of the same job (others refused, or removed with
    --overwrite), a half-done join removed, and room for every shard plus the joined file."""
    out, world = Path(cfg.output_path), len(ranges)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    stale = leftover_files(out, world)
    if stale and not cfg.overwrite:
        m = re.search(r"-of-(\d+)", stale[0].name[len(out.name):])
        other = f"{m.group(1)} processes" if m else "one process"
        raise FileExistsError(f"{stale[0]} is left by an interrupted run with {other}: rerun with {other} to finish "
                              f"it, or pass --overwrite to start over with {world}")
    for p in stale:
        p.unlink()
    if join_partial_path(out).exists():
        print(f"{join_partial_path(out)} is a join that was interrupted: it is redone", flush=True)
        join_partial_path(out).unlink()
    for rank, (lo, hi) in enumerate(ranges):
        for p in (shard_path(out, rank, world), partial_path(shard_path(out, rank, world))):
            if not p.exists():
                continue
            try:
                ok = same_job(p, meta, ids[lo:hi])
                if ok and p.suffix != ".partial" and not _is_complete(p):
                    raise FeatureFileError(f"{p} is not complete")
            except (OSError, KeyError, FeatureFileError):
                print(f"{p} is unreadable (interrupted during a write?): starting that shard over", flush=True)
                p.unlink()
                continue
            if ok:
                continue
            if not cfg.overwrite:
                with h5py.File(p, "r") as f:
                    batch = int(f.attrs.get("batch_size", cfg.batch_size))
                if batch != cfg.batch_size:
                    raise FileExistsError(f"{p} was cut for --batch_size {batch} (shards end at batch boundaries): "
                                          f"rerun with --batch_size {batch} to resume it, or pass --overwrite to "
                                          "start over")
                raise FileExistsError(f"{p} is a feature shard of a different job (other backbone, images or dtype); "
                                      "pass --overwrite to replace it, or choose another output path")
            p.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space_for_shards(out, [shard_path(out, r, world) for r in range(world)],
                                [hi - lo for lo, hi in ranges], tokens, channels, cfg.dtype)


def _is_complete(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return bool(f.attrs.get("complete"))


def _extract_sharded(cfg: GeneratorConfig, info: DistInfo, group) -> Path:
    """This process's shard (resumed when a partial one is there), then the join on the main process."""
    device, rank, world = info.device, info.rank, info.world
    records, backbone, bb, tokens, channels, attrs = prepare_job(cfg, device)
    precision = resolve_precision(cfg.precision, device)
    ids = [r.image_id for r in records]
    ranges = shard_ranges(len(records), world, cfg.batch_size)
    out = Path(cfg.output_path)
    if info.is_main:
        size = required_bytes(len(records), tokens, channels, cfg.dtype)
        print(f"{len(records)} images -> {out}: ({len(records)}, {tokens}, {channels}) {cfg.dtype}, "
              f"{size / 1e9:.2f} GB, by {world} processes (shards of up to {max(b - a for a, b in ranges)} images, "
              f"{2 * size / 1e9:.2f} GB on disk while they are joined); backbone {bb.name} at {bb.img_size}px on "
              f"{device.type} ({precision})", flush=True)
    error = None
    if info.is_main:
        try:
            _prepare_shards(cfg, {**attrs, "tokens": tokens, "channels": channels, "dtype": cfg.dtype}, ids, ranges,
                            tokens, channels)
        except (FileExistsError, OSError, FeatureFileError) as e:
            error = e
    _agree(error, group)

    lo, hi = ranges[rank]
    shard, errors = shard_path(out, rank, world), []
    if hi > lo and shard.exists():
        print(f"rank {rank}: shard {shard.name} is already complete", flush=True)
    elif hi > lo:
        writer = FeatureWriter(shard, ids[lo:hi], tokens, channels, cfg.dtype, attrs, overwrite=cfg.overwrite)
        try:
            if writer.num_written:
                print(f"rank {rank}: resuming after {writer.num_written} of its {hi - lo} images already written",
                      flush=True)
            errors = _extract(backbone, _Images(records[lo + writer.num_written:hi], bb), writer, cfg, device,
                              precision, desc=f"features (rank 0 of {world})", progress=info.is_main)
            writer.finish()
        finally:
            writer.close()
    unreadable, example = 0, ""
    if hi > lo:
        with h5py.File(shard, "r") as f:
            invalid = np.flatnonzero(~f["valid"][()])
        unreadable = len(invalid)
        example = errors[0] if errors else (f"{records[lo + invalid[0]].path}" if unreadable else "")
    counts = all_gather_objects((unreadable, example), group)  # every shard is complete past this point

    error = None
    if info.is_main:
        try:
            join_feature_shards(out, [shard_path(out, r, world) for r, (a, b) in enumerate(ranges) if b > a], ids,
                                overwrite=cfg.overwrite)
        except (FileExistsError, OSError, FeatureFileError) as e:
            error = e
    _agree(error, group)
    total_unreadable = sum(c for c, _ in counts)
    if total_unreadable:
        _unreadable_verdict(total_unreadable, next(e for c, e in counts if c), len(records), cfg.max_unreadable,
                            show=info.is_main)
    if info.is_main:
        print(f"wrote {out}", flush=True)
    return out
