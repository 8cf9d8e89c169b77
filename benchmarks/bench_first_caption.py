"""Time to the first caption and peak memory as a user waits: `demo.py` on one photo in a fresh process, per backend,
first in a fresh cache (cold), then the same command again (warm), each under `/usr/bin/time -v`.

    python benchmarks/bench_first_caption.py --checkpoint seed.pth --image photo.jpg
    python benchmarks/bench_first_caption.py --checkpoint official.pth --vocab demo_coco_tokens.pickle --image cat.jpg
    python benchmarks/bench_first_caption.py --random optimizer_expansionnet --backends auto,torch,onnx --repeats 3

--random MODEL writes random weights of the real sizes first (into --work_dir, kept there for the next run): the seed
model (optimizer_expansionnet: SwinV2-B 384 px, 2 + 2 layers) as a training checkpoint, or ExpansionNet v2
(expansionnet_v2: Swin-L 384 px, 3 + 3 layers) in the official release's layout with its vocabulary pickle; and a
synthetic photo when --image is not given.

Backends: auto (the default of every entry point), torch, onnx (a checkpoint on ONNX Runtime: the cold run exports it
into the fresh cache, the warm run reuses the export) and onnx_folder (that export loaded as an exported folder; needs
onnx before it). --repeats N runs each backend's cold and warm pair N times and reports medians. Before each cold
run the model's files are dropped from the page cache (posix_fadvise), so it reads them from disk as a first run
would; Python's own modules stay cached. Each run gets its own $XDG_CACHE_HOME under
--work_dir, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, JsonFigures, end_to_end_config
from PIL import Image

from data.vocab import Vocabulary
from deploy.checkpoints import save_model_checkpoint
from models import build_model

BACKENDS = ("auto", "torch", "onnx", "onnx_folder")
TIME = "/usr/bin/time"


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the cached pages of a file or of every file under a folder (clean pages only)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_random_model(name: str, folder: Path, vocab_size: int = 10_000) -> tuple[Path, Path | None]:
    """Random weights of a real model's size, saved as a user would get them: the seed model as one of our training
    checkpoints (config and vocabulary inside), ExpansionNet v2 in the official layout (weights only) beside a
    vocabulary pickle like the release's demo_coco_tokens.pickle. Returns (checkpoint, vocabulary or None)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pth"
    vocab_path = folder / "demo_coco_tokens.pickle" if name == "expansionnet_v2" else None
    if path.exists() and (vocab_path is None or vocab_path.exists()):
        return path, vocab_path
    from dataclasses import replace

    torch.manual_seed(0)
    words = ["PAD", "SOS", "EOS", "UNK", *(f"w{i}" for i in range(vocab_size - 4))]
    cfg = replace(end_to_end_config(name), vocab_size=vocab_size)
    model = build_model(cfg).eval()
    print(f"writing random {name} weights ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) to "
          f"{path}", flush=True)
    if vocab_path is None:
        save_model_checkpoint(path, model, cfg, Vocabulary(words))
    else:
        torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": {}}, path)
        with open(vocab_path, "wb") as f:
            pickle.dump({"word2idx_dict": {w: i for i, w in enumerate(words)}, "idx2word_list": words,
                         "sos_str": "SOS", "eos_str": "EOS"}, f)
    return path, vocab_path


def timed_run(cmd: list[str], env: dict[str, str]) -> dict[str, float | str]:
    """Wall seconds, peak resident memory (GB) and the first caption of one demo.py process."""
    proc = subprocess.run([TIME, "-v", *cmd], env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr)[1]
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    caption = next((line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")), "")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(rss_kb / 1e6, 2), "caption": caption}


def _median(pairs: list[tuple[dict, dict]], run: int, key: str) -> float:
    """The median of one figure over the (cold, warm) pairs: run 0 the cold ones, 1 the warm ones."""
    return round(statistics.median(pair[run][key] for pair in pairs), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="a training checkpoint, model folder or official checkpoint")
    p.add_argument("--vocab", default="", help="the vocabulary an official checkpoint needs")
    p.add_argument("--random", default="", choices=("", "optimizer_expansionnet", "expansionnet_v2"),
                   help="instead of --checkpoint: random weights of this model's real size (written to --work_dir)")
    p.add_argument("--image", default="", help="the photo to caption (default with --random: a synthetic one)")
    p.add_argument("--backends", default="auto,onnx,onnx_folder", help=f"comma-separated, of {BACKENDS}")
    p.add_argument("--repeats", type=int, default=1, help="cold and warm pairs per backend (medians reported)")
    p.add_argument("--demo_args", default="", help="more demo.py flags, e.g. '--beam_size 3 --max_len 20'")
    p.add_argument("--work_dir", default="", help="where the fresh caches go (default: a temporary folder)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args()
    backends = args.backends.split(",")
    if unknown := set(backends) - set(BACKENDS):
        p.error(f"--backends: unknown {sorted(unknown)}; choose from {BACKENDS}")
    if "onnx_folder" in backends and "onnx" not in backends[:backends.index("onnx_folder")]:
        p.error("--backends: onnx_folder loads the export that an earlier onnx run made; list onnx before it")
    if bool(args.checkpoint) == bool(args.random):
        p.error("--checkpoint or --random: give one of them")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if not args.random and not args.image:
        p.error("--image: give the photo to caption")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="first_caption_"))
    if args.random:
        checkpoint, vocab = write_random_model(args.random, work / "models")
        args.checkpoint, args.vocab = str(checkpoint), str(vocab or "")
    if not args.image:
        args.image = str(work / "photo.jpg")
        torch.manual_seed(1)
        Image.fromarray((torch.rand(480, 640, 3) * 255).byte().numpy()).save(args.image, quality=90)
    figures = JsonFigures(args.json, "bench_first_caption", "cpu", vars(args))
    model_files = [Path(args.checkpoint), *([Path(args.vocab)] if args.vocab else [])]
    export_folder: Path | None = None
    print(f"{'backend':<12} {'cold s':>7} {'warm s':>7} {'cold/warm':>9} {'cold GB':>8} {'warm GB':>8}  caption "
          f"(medians of {args.repeats})")
    try:
        for backend in backends:
            cache = work / f"xdg-{backend}"
            env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
            source = [str(export_folder)] if backend == "onnx_folder" else [args.checkpoint]
            cmd = [sys.executable, "demo.py", "--checkpoint", *source, "--image_paths", args.image,
                   "--backend", "onnx" if backend == "onnx_folder" else backend, *args.demo_args.split()]
            if args.vocab and backend != "onnx_folder":
                cmd += ["--vocab", args.vocab]
            pairs = []
            for _ in range(args.repeats):
                shutil.rmtree(cache, ignore_errors=True)
                for f in model_files if backend != "onnx_folder" else [export_folder]:
                    drop_from_page_cache(f)
                pairs.append((timed_run(cmd, env), timed_run(cmd, env)))
            if backend == "onnx":
                (made,) = (cache / "expansionnet" / "onnx").iterdir()
                export_folder = work / "export"
                shutil.rmtree(export_folder, ignore_errors=True)
                shutil.move(made, export_folder)
            shutil.rmtree(cache, ignore_errors=True)

            row = {"cold_s": _median(pairs, 0, "seconds"), "warm_s": _median(pairs, 1, "seconds"),
                   "cold_over_warm": round(statistics.median(c["seconds"] / w["seconds"] for c, w in pairs), 2),
                   "cold_peak_rss_gb": _median(pairs, 0, "peak_rss_gb"),
                   "warm_peak_rss_gb": _median(pairs, 1, "peak_rss_gb"),
                   "runs": [[c["seconds"], w["seconds"], c["peak_rss_gb"], w["peak_rss_gb"]] for c, w in pairs],
                   "caption": pairs[0][0]["caption"],
                   "same_caption": len({r["caption"] for pair in pairs for r in pair}) == 1}
            figures.add(backend, values=row)
            print(f"{backend:<12} {row['cold_s']:>7} {row['warm_s']:>7} {row['cold_over_warm']:>9} "
                  f"{row['cold_peak_rss_gb']:>8} {row['warm_peak_rss_gb']:>8}  {row['caption'][:60]}"
                  f"{'' if row['same_caption'] else ' (captions differ between runs)'}", flush=True)
        figures.finish()
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
