"""Data speed: feature generation images/s, and random-batch reads from our HDF5 layout against the reference's.

    python benchmarks/bench_data.py                 # CPU: SwinV2-B features at 384px, reads of batches of 48
    python benchmarks/bench_data.py --device cuda --gen_batch 64 --precision bf16
    python benchmarks/bench_data.py --device cuda --gen_batch 64 --gen_batches 10 --precision bf16 --reads 0 \
        --json data.json                            # feature generation only, as JSON too

The reference stores one fp32 dataset per image ("<id>_features") and reads them one by one; ours is one fp16
(N, tokens, C) dataset chunked by image, read with one sorted call per batch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from common import add_backbone_flags, start_run  # first: puts the repository root on sys.path

from data.features import FeatureReader, FeatureWriter
from models.backbone import backbone_tokens, create_backbone
from models.config import backbone_preset
from utils.runtime import autocast


def bench_generation(device: torch.device, batch: int, batches: int, precision: str, backbone: str = "swinv2_b",
                     img_size: int = 384) -> float:
    """Images/s of the backbone forward (SwinV2-B) that data_generator.py runs (inference mode, autocast), the
    features copied to the host as it does."""
    torch.manual_seed(0)
    model = create_backbone(backbone_preset(backbone, img_size=img_size)).eval().to(device)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast(device, precision):
        backbone_tokens(model, images)
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            backbone_tokens(model, images).float().cpu()
        sync()
    return batch * batches / (time.perf_counter() - t0)


def bench_reads(num_images: int, batch: int, reads: int, tokens: int, channels: int) -> tuple[float, float]:
    """Random batches per second: our contiguous fp16 file vs one fp32 dataset per image read one by one."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = Path(tmp) / "ours.hdf5", Path(tmp) / "reference.hdf5"
        ids = list(range(num_images))
        writer = FeatureWriter(ours, ids, tokens, channels, "fp16", {"backbone_name": "bench"})
        with h5py.File(ref, "w") as f:
            for start in range(0, num_images, 256):
                block = rng.standard_normal((min(256, num_images - start), tokens, channels), dtype=np.float32)
                writer.append(block)
                for i, row in enumerate(block):
                    f.create_dataset(f"{start + i}_features", data=row)
        writer.finish()
        draws = [rng.choice(num_images, batch, replace=False) for _ in range(reads)]
        reader = FeatureReader(ours)
        times_ours = []
        for d in draws:
            t0 = time.perf_counter()
            reader.read(d.tolist())
            times_ours.append(time.perf_counter() - t0)
        times_ref = []
        with h5py.File(ref, "r", rdcc_nbytes=0) as f:
            for d in draws:
                t0 = time.perf_counter()
                torch.stack([torch.from_numpy(f[f"{i}_features"][()]) for i in d])
                times_ref.append(time.perf_counter() - t0)
    return 1 / statistics.median(times_ref), 1 / statistics.median(times_ours)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--gen_batch", type=int, default=4)
    p.add_argument("--gen_batches", type=int, default=2, help="timed batches of feature generation (0 skips it)")
    add_backbone_flags(p, "feature generation", default="swinv2_b")
    p.add_argument("--num_images", type=int, default=2000, help="images in the read benchmark's files")
    p.add_argument("--read_batch", type=int, default=48)
    p.add_argument("--reads", type=int, default=30, help="timed random batches of the read benchmark (0 skips it)")
    p.add_argument("--json", default="", help="also write the figures (with device, versions, settings) to this file")
    a = p.parse_args()
    device, _, figures = start_run(a, "bench_data")
    if a.reads:
        ref, ours = bench_reads(a.num_images, a.read_batch, a.reads, 144, 1024)
        print(f"HDF5 random batches of {a.read_batch} x (144, 1024) from {a.num_images} images: reference layout "
              f"{ref:.1f} batches/s, ours {ours:.1f} batches/s ({ours / ref:.1f}x; {ours * a.read_batch:.0f} img/s)",
              flush=True)
        figures.add("reads", values={"reference_batches_s": ref, "ours_batches_s": ours, "ratio": ours / ref,
                                     "ours_img_s": ours * a.read_batch, "batch": a.read_batch,
                                     "num_images": a.num_images})
    if a.gen_batches:
        rate = bench_generation(device, a.gen_batch, a.gen_batches, a.precision, a.backbone, a.img_size)
        label = "SwinV2-B" if a.backbone == "swinv2_b" else a.backbone
        print(f"feature generation, {label} {a.img_size}px, batch {a.gen_batch}, {a.precision}: {rate:.2f} img/s",
              flush=True)
        figures.add("generation", values={"img_s": rate, "batch": a.gen_batch, "batches": a.gen_batches,
                                          "precision": a.precision, "img_size": a.img_size, "backbone": a.backbone})
    figures.finish()


if __name__ == "__main__":
    main()
