"""Cache backbone features of every image of a dataset in one HDF5 file (phases 1 and 4 of the recipe).

The backbone comes from a Microsoft or timm Swin file (phase 1), one of our end-to-end checkpoints (phase 4, its
backbone part), or a backbone file of this project. Killed half-way, the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.captions import DatasetError, ImageRecord, load_records
from data.features import FeatureWriter, required_bytes
from data.images import ImageLoadError, load_image_tensor
from engine.checkpoints import CheckpointError, read_backbone_file
from models.backbone import backbone_output_shape, backbone_tokens, create_backbone, load_backbone_state_dict
from models.config import BackboneConfig
from utils.checkpoint import state_dict_sha256
from utils.runtime import autocast, resolve_device, resolve_precision


@dataclass(frozen=True)
class GeneratorConfig:
    save_model_path: str
    output_path: str
    images_path: str
    captions_path: str
    dtype: str
    batch_size: int
    device: str
    num_workers: int
    img_size: int
    overwrite: bool
    precision: str


def parse_config(argv: list[str] | None = None) -> GeneratorConfig:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--save_model_path", required=True,
                   help="backbone weights: Microsoft/timm Swin .pth, our end-to-end checkpoint, or our backbone file")
    p.add_argument("--output_path", required=True, help="HDF5 file to write")
    p.add_argument("--images_path", required=True, help="image folder (Karpathy filepath/filename live under it)")
    p.add_argument("--captions_path", required=True, help="Karpathy json (or its folder) or a JSON-lines manifest")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="stored precision (fp16 halves the size)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast while extracting (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--num_workers", type=int, default=2, help="image-decoding worker processes")
    p.add_argument("--img_size", type=int, default=0, help="input size (0: the backbone's own, 384 for COCO)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing complete file")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error("--batch_size must be at least 1")
    for name in ("save_model_path", "images_path", "captions_path"):
        if not Path(getattr(a, name)).exists():
            p.error(f"--{name} {getattr(a, name)}: no such file or folder")
    return GeneratorConfig(a.save_model_path, a.output_path, a.images_path, a.captions_path, a.dtype, a.batch_size,
                           a.device, a.num_workers, a.img_size, a.overwrite, a.precision)


class _Images(Dataset):
    """(tensor, readable?) per record; an unreadable image becomes zeros marked invalid, with a warning."""

    def __init__(self, records: list[ImageRecord], bb: BackboneConfig) -> None:
        self.records, self.bb = records, bb

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        r = self.records[i]
        try:
            return load_image_tensor(r.path, self.bb.img_size, self.bb.mean, self.bb.std, name=str(r.path)), True
        except (ImageLoadError, OSError) as e:
            warnings.warn(f"skipping unreadable image {r.path}: {e}", stacklevel=1)
            return torch.zeros(3, self.bb.img_size, self.bb.img_size), False


def main(cfg: GeneratorConfig) -> Path:
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    records = load_records(cfg.captions_path, cfg.images_path)
    bb, state = read_backbone_file(cfg.save_model_path, img_size=cfg.img_size or None)
    if cfg.img_size:
        bb = BackboneConfig.from_dict({**bb.to_dict(), "img_size": cfg.img_size})
    tokens, channels = backbone_output_shape(bb)
    backbone = create_backbone(bb)
    load_backbone_state_dict(backbone, state, cfg.save_model_path)
    backbone.eval().to(device)
    attrs = {"backbone_name": bb.name, "backbone_config": bb.to_dict(), "weights_sha256": state_dict_sha256(
        backbone.state_dict()), "img_size": bb.img_size, "source_checkpoint": str(Path(cfg.save_model_path).resolve()),
        "captions_path": str(Path(cfg.captions_path).resolve()), "images_path": str(Path(cfg.images_path).resolve()),
        "batch_size": cfg.batch_size}
    size = required_bytes(len(records), tokens, channels, cfg.dtype)
    print(f"{len(records)} images -> {cfg.output_path}: ({len(records)}, {tokens}, {channels}) {cfg.dtype}, "
          f"{size / 1e9:.2f} GB; backbone {bb.name} at {bb.img_size}px on {device} ({precision})", flush=True)
    writer = FeatureWriter(cfg.output_path, [r.image_id for r in records], tokens, channels, cfg.dtype, attrs,
                           overwrite=cfg.overwrite)
    try:
        start = writer.num_written
        if start:
            print(f"resuming after {start} images already written", flush=True)
        loader = DataLoader(_Images(records[start:], bb), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda")
        bar = tqdm(total=len(records), initial=start, unit="img", desc="features", dynamic_ncols=True)
        t0, done = time.perf_counter(), 0
        with torch.inference_mode():
            for pixels, valid in loader:
                with autocast(device, precision):
                    feats = backbone_tokens(backbone, pixels.to(device, non_blocking=True))
                writer.append(feats.float().cpu().numpy(), valid.numpy().astype(bool))
                done += len(pixels)
                bar.update(len(pixels))
                bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.1f}")
        bar.close()
        writer.finish()
    finally:
        writer.close()
    print(f"wrote {cfg.output_path}", flush=True)
    return Path(cfg.output_path)


if __name__ == "__main__":
    try:
        main(parse_config())
    except (CheckpointError, DatasetError, FileExistsError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
