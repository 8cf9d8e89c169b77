"""Feature extraction (phases 1 and 4): every image of a dataset through the backbone into one HDF5 file.

data_generator.py is its command line. Unreadable images are recorded as invalid rows; when more than
`max_unreadable` of the images are missing or unreadable the run fails with one summary line instead of writing a
file of invalid rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.captions import DatasetError, ImageRecord, load_records
from data.features import FeatureWriter, required_bytes
from data.images import ImageLoadError, load_image_tensor
from engine.checkpoints import read_backbone_file
from models.backbone import backbone_output_shape, backbone_tokens, create_backbone, load_backbone_state_dict
from models.config import BackboneConfig
from utils.checkpoint import state_dict_sha256
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
    captions_path: str = option("", "Karpathy json (or its folder) or a JSON-lines manifest", required=True,
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
        raise DatasetError(f"{len(missing)} of {len(records)} image files do not exist (e.g. {missing[0].path}); "
                           f"check --images_path {images_path} (relative paths of a manifest resolve against the "
                           "manifest's folder when --images_path is not given)")


def load_backbone(cfg: GeneratorConfig) -> tuple[torch.nn.Module, BackboneConfig]:
    """The backbone of --backbone at --img_size, weights loaded, in eval mode."""
    bb, state = read_backbone_file(cfg.backbone, img_size=cfg.img_size or None)
    if cfg.img_size:
        bb = BackboneConfig.from_dict({**bb.to_dict(), "img_size": cfg.img_size})
    backbone = create_backbone(bb)
    load_backbone_state_dict(backbone, state, cfg.backbone)
    return backbone.eval(), bb


def extract_features(cfg: GeneratorConfig) -> Path:
    """Write (or finish) the feature file of cfg; returns its path."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    records = load_records(cfg.captions_path, cfg.images_path)
    check_images_present(records, cfg.max_unreadable, cfg.images_path)
    backbone, bb = load_backbone(cfg)
    backbone.to(device)
    tokens, channels = backbone_output_shape(bb)
    attrs = {"backbone_name": bb.name, "backbone_config": bb.to_dict(), "weights_sha256": state_dict_sha256(
        backbone.state_dict()), "img_size": bb.img_size, "source_checkpoint": str(Path(cfg.backbone).resolve()),
        "captions_path": str(Path(cfg.captions_path).resolve()), "images_path": str(Path(cfg.images_path).resolve()),
        "batch_size": cfg.batch_size}
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
             device: torch.device, precision: str) -> list[str]:
    """Run the images through the backbone in batches, appending to writer; returns the unreadable images' errors."""
    loader = DataLoader(images, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    bar = tqdm(total=writer.total, initial=writer.num_written, unit="img", desc="features", dynamic_ncols=True)
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
    if not errors:
        return
    summary = (f"{len(errors)} of {total} images could not be read and are marked invalid in the file (training "
               f"skips them), e.g. {errors[0]}")
    if len(errors) > max_unreadable * total:
        raise DatasetError(summary + f"; that is more than --max_unreadable {max_unreadable:g} of the images")
    print(f"warning: {summary}", flush=True)
