"""Time to the first caption and peak memory as a user waits: `demo.py` on one photo in a fresh process, per backend,
first in a fresh cache (cold), then the same command again (warm), each under `/usr/bin/time -v`.

    python benchmarks/bench_first_caption.py --checkpoint seed.pth --image photo.jpg
    python benchmarks/bench_first_caption.py --checkpoint official.pth --vocab demo_coco_tokens.pickle --image cat.jpg

Backends: auto (the default of every entry point), torch, onnx (a checkpoint on ONNX Runtime: the cold run exports it
into the fresh cache, the warm run reuses the export) and onnx_folder (that export loaded as an exported folder; needs
onnx before it). Before each cold run the model's files are dropped from the page cache (posix_fadvise), so it reads
them from disk as a first run would; Python's own modules stay cached. Each run gets its own $XDG_CACHE_HOME under
--work_dir, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, JsonFigures

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint, model folder or official checkpoint")
    p.add_argument("--vocab", default="", help="the vocabulary an official checkpoint needs")
    p.add_argument("--image", required=True, help="the photo to caption")
    p.add_argument("--backends", default="auto,onnx,onnx_folder", help=f"comma-separated, of {BACKENDS}")
    p.add_argument("--demo_args", default="", help="more demo.py flags, e.g. '--beam_size 3 --max_len 20'")
    p.add_argument("--work_dir", default="", help="where the fresh caches go (default: a temporary folder)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args()
    backends = args.backends.split(",")
    if unknown := set(backends) - set(BACKENDS):
        p.error(f"--backends: unknown {sorted(unknown)}; choose from {BACKENDS}")
    if "onnx_folder" in backends and "onnx" not in backends[:backends.index("onnx_folder")]:
        p.error("--backends: onnx_folder loads the export that an earlier onnx run made; list onnx before it")
    figures = JsonFigures(args.json, "bench_first_caption", "cpu", vars(args))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="first_caption_"))
    model_files = [Path(args.checkpoint), *([Path(args.vocab)] if args.vocab else [])]
    export_folder: Path | None = None
    print(f"{'backend':<12} {'cold s':>7} {'warm s':>7} {'cold/warm':>9} {'cold GB':>8} {'warm GB':>8}  caption")
    try:
        for backend in backends:
            cache = work / f"xdg-{backend}"
            shutil.rmtree(cache, ignore_errors=True)
            env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
            source = [str(export_folder)] if backend == "onnx_folder" else [args.checkpoint]
            cmd = [sys.executable, "demo.py", "--checkpoint", *source, "--image_paths", args.image,
                   "--backend", "onnx" if backend == "onnx_folder" else backend, *args.demo_args.split()]
            if args.vocab and backend != "onnx_folder":
                cmd += ["--vocab", args.vocab]
            for f in model_files if backend != "onnx_folder" else [export_folder]:
                drop_from_page_cache(f)
            cold = timed_run(cmd, env)
            warm = timed_run(cmd, env)
            if backend == "onnx":
                (made,) = (cache / "expansionnet" / "onnx").iterdir()
                export_folder = work / "export"
                shutil.rmtree(export_folder, ignore_errors=True)
                shutil.move(made, export_folder)
            shutil.rmtree(cache, ignore_errors=True)
            row = {"cold_s": cold["seconds"], "warm_s": warm["seconds"],
                   "cold_over_warm": round(cold["seconds"] / warm["seconds"], 2), "cold_peak_rss_gb":
                   cold["peak_rss_gb"], "warm_peak_rss_gb": warm["peak_rss_gb"], "caption": cold["caption"],
                   "same_caption_warm": cold["caption"] == warm["caption"]}
            figures.add(backend, values=row)
            print(f"{backend:<12} {row['cold_s']:>7} {row['warm_s']:>7} {row['cold_over_warm']:>9} "
                  f"{row['cold_peak_rss_gb']:>8} {row['warm_peak_rss_gb']:>8}  {cold['caption'][:60]}", flush=True)
        figures.finish()
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
