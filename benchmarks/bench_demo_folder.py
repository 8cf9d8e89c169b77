"""Images per second of `demo.py` on a folder: streamed in batches (the next batch read while one is captioned)
against --batch_size 1, in alternating rounds of the same run, each a fresh process writing a fresh --output_path.
The figure is demo.py's own (captioning time after the model is loaded, which it prints).

    python -m data.synthetic --num_train 64 --num_val 1 --num_test 1 --output_path /tmp/syn
    python benchmarks/bench_demo_folder.py --checkpoint best.pth --folder /tmp/syn/images --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, JsonFigures

RATE = re.compile(r"captioned (\d+) images in ([\d.]+) s \(([\d.]+) images/s; model loaded in ([\d.]+) s\)")


def demo_rate(checkpoint: str, folder: str, batch_size: int, extra: list[str], out: Path) -> float:
    """images/s of one demo.py process captioning the folder into `out` (removed first)."""
    for path in (out, out.with_name(out.name + ".progress")):
        path.unlink(missing_ok=True)
    cmd = [sys.executable, "demo.py", "--checkpoint", checkpoint, "--image_paths", folder, "--output_path", str(out),
           "--batch_size", str(batch_size), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    found = RATE.search(proc.stderr)
    if proc.returncode not in (0, 1) or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(found[3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the checkpoint demo.py captions with")
    p.add_argument("--folder", required=True, help="the folder of images to caption")
    p.add_argument("--batch_size", type=int, default=8, help="the streamed batch size (demo.py's default: 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both settings (medians reported)")
    p.add_argument("--demo_args", default="", help="more demo.py flags, e.g. '--beam_size 3 --max_len 20'")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args()
    if not Path(args.folder).is_dir():
        p.error(f"--folder {args.folder} is not a folder")
    if args.rounds < 1 or args.batch_size < 1:
        p.error("--rounds and --batch_size must be at least 1")
    figures = JsonFigures(args.json, "bench_demo_folder", "cpu", vars(args))
    rates: dict[int, list[float]] = {args.batch_size: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="demo_folder_") as work:
        for r in range(args.rounds):
            for batch_size in rates:
                rate = demo_rate(args.checkpoint, args.folder, batch_size, args.demo_args.split(),
                                 Path(work) / "captions.jsonl")
                rates[batch_size].append(rate)
                print(f"round {r + 1}: --batch_size {batch_size}: {rate:.2f} images/s", flush=True)
    batched, single = (statistics.median(rates[b]) for b in (args.batch_size, 1))
    ratios = [b / s for b, s in zip(rates[args.batch_size], rates[1])]
    figures.add("images_per_s", values={f"batch_{args.batch_size}": batched, "batch_1": single,
                                        "ratio_median": round(statistics.median(ratios), 2),
                                        "rounds": {str(k): v for k, v in rates.items()}})
    print(f"median: --batch_size {args.batch_size} {batched:.2f} images/s, --batch_size 1 {single:.2f} images/s, "
          f"ratio {statistics.median(ratios):.2f} (per-round ratios {', '.join(f'{x:.2f}' for x in ratios)})")
    figures.finish()


if __name__ == "__main__":
    main()
