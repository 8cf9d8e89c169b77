"""Run the six-phase recipe in one command, each phase in its own folder; run it again to resume.

    python pipeline.py --preset quickstart                     # synthetic data, tiny models, CPU, a few minutes
    python pipeline.py --preset coco --images_path coco/ --captions_path dataset_coco.json \\
        --backbone swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth --run_dir runs/coco
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.pipeline import Manifest, parse_phases, recipe, run_phases
from engine.presets import PRESETS, coco_inputs, quickstart_inputs
from engine.report import quickstart_report


@dataclass(frozen=True)
class PipelineConfig:
    preset: str
    run_dir: str
    phases: tuple[int, ...]
    images_path: str
    captions_path: str
    backbone: str
    num_train: int
    num_val: int
    num_test: int
    report: bool


def parse_config(argv: list[str] | None = None) -> PipelineConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=PRESETS, required=True)
    p.add_argument("--run_dir", default="", help="where every phase gets its folder (default: runs/<preset>)")
    p.add_argument("--phases", default="1-6", help="subset to run, e.g. 2-5 (inputs must exist)")
    p.add_argument("--images_path", default="", help="COCO image folder (coco presets)")
    p.add_argument("--captions_path", default="", help="Karpathy json or manifest (coco presets)")
    p.add_argument("--backbone", default="", help="Swin weights: SwinV2-B for coco, Swin-L for coco-expansionnet-v2")
    p.add_argument("--num_train", type=int, default=4000, help="quickstart: synthetic training images")
    p.add_argument("--num_val", type=int, default=500, help="quickstart: synthetic validation images")
    p.add_argument("--num_test", type=int, default=500, help="quickstart: synthetic test images")
    p.add_argument("--no_report", action="store_true", help="quickstart: skip the final evaluation and report")
    a = p.parse_args(argv)
    try:
        phases = tuple(parse_phases(a.phases))
    except ValueError as e:
        p.error(str(e))
    if a.preset != "quickstart":
        for name in ("images_path", "captions_path", "backbone"):
            if not getattr(a, name):
                p.error(f"--preset {a.preset} needs --{name}")
            if not Path(getattr(a, name)).exists():
                p.error(f"--{name} {getattr(a, name)}: no such file or folder")
    return PipelineConfig(a.preset, a.run_dir or f"runs/{a.preset}", phases, a.images_path, a.captions_path,
                          a.backbone, a.num_train, a.num_val, a.num_test, not a.no_report)


def main(cfg: PipelineConfig) -> int:
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir / "pipeline.json", cfg.preset)
    if cfg.preset == "quickstart":
        print(f"== quickstart in {run_dir}: synthetic shapes dataset and a from-scratch tiny SwinV2", flush=True)
        inputs = quickstart_inputs(run_dir, cfg.num_train, cfg.num_val, cfg.num_test)
    else:
        inputs = coco_inputs(Path(cfg.images_path), Path(cfg.captions_path), Path(cfg.backbone),
                             expansionnet_v2=cfg.preset == "coco-expansionnet-v2")
    manifest.data["inputs"] = {"images_path": str(inputs.images_path), "captions_path": str(inputs.captions_path),
                               "backbone": str(inputs.backbone)}
    manifest.save()
    outputs = run_phases(run_dir, recipe(run_dir, inputs), list(cfg.phases), manifest)
    if cfg.preset == "quickstart" and cfg.report and 3 in outputs and 6 in outputs:
        print("== evaluating the XE (phase 3) and final (phase 6) checkpoints on the test split", flush=True)
        results = quickstart_report(run_dir, inputs.captions_path, inputs.images_path, outputs[3], outputs[6],
                                    manifest.data)
        manifest.data["results"] = {"test_cider_xe": results["test_xe"]["metrics"]["CIDEr-D"],
                                    "test_cider_final": results["test_final"]["metrics"]["CIDEr-D"],
                                    "best_constant_cider": results["best_constant_cider"],
                                    "colour_named": results["grounded_final"]["colour_named"],
                                    "shape_accuracy": results["grounded_final"]["shape_accuracy"]}
        manifest.save()
        r = manifest.data["results"]
        print(f"test CIDEr-D: {r['test_cider_xe']:.1f} after XE, {r['test_cider_final']:.1f} after SCST; best "
              f"constant caption {r['best_constant_cider']:.1f}; colours named correctly for "
              f"{100 * r['colour_named']:.0f}% of the shapes, shape words right for {100 * r['shape_accuracy']:.0f}%"
              f"\nreport: {run_dir / 'report.md'}", flush=True)
    print(f"== done in {time.perf_counter() - t0:.0f} s; manifest: {run_dir / 'pipeline.json'}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(parse_config()))
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
