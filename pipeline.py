"""Run the whole recipe in one command, each phase in its own folder; run it again to resume.

    python pipeline.py --preset quickstart                     # synthetic data, tiny models, CPU, a few minutes
    python pipeline.py --preset coco --images_path coco/ --captions_path dataset_coco.json \\
        --backbone swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth --run_dir runs/coco
    python pipeline.py --preset coco ... --set phase2.num_epochs=1 --set lr=1e-4     # overrides, recorded
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.overrides import OverrideError, apply_overrides
from engine.pipeline import Manifest, parse_phases, run_phases
from engine.presets import PRESETS, coco_recipe, quickstart_recipe
from engine.report import quickstart_report
from utils.cli import ArgumentParser, add_dataclass_flags, dataclass_values, plain_warnings
from utils.fields import option

GIVEN_PATHS = ("images_path", "captions_path", "backbone")


@dataclass(frozen=True)
class PipelineConfig:
    """Every pipeline.py setting."""

    preset: str = option("quickstart", "which recipe", choices=PRESETS, required=True, group="data")
    images_path: str = option("", "image folder (coco presets)", group="data")
    captions_path: str = option("", "Karpathy json or manifest (coco presets)", group="data")
    backbone: str = option("", "backbone weights: SwinV2-B for coco, Swin-L for coco-expansionnet-v2", group="model")
    num_train: int = option(4000, "quickstart: synthetic training images", group="data")
    num_val: int = option(500, "quickstart: synthetic validation images", group="data")
    num_test: int = option(500, "quickstart: synthetic test images", group="data")
    overrides: tuple[str, ...] = option((), "change a setting of every phase that has it (key=value) or of one "
                                        "phase (phaseN.key=value); repeatable, recorded in pipeline.json",
                                        flag="set", nargs="+", group="optimisation")
    run_dir: str = option("", "where every phase gets its folder (default: runs/<preset>)", group="runtime")
    phases: str = option("", "subset of the phases to run, e.g. 2-5 (their inputs must exist; default: all)",
                         group="runtime")
    report: bool = option(True, "quickstart: evaluate on the test split and write report.md", group="runtime")


def parse_config(argv: list[str] | None = None) -> PipelineConfig:
    p = ArgumentParser(description=__doc__)
    add_dataclass_flags(p, PipelineConfig)
    p.group("runtime").add_argument("--no_report", dest="report", action="store_false", help="same as --report False")
    args = p.parse_args(argv)
    cfg = PipelineConfig(**dataclass_values(args, PipelineConfig))
    try:
        parse_phases(cfg.phases or "0-6")
    except ValueError as e:
        p.error(str(e))
    given = [name for name in GIVEN_PATHS if getattr(cfg, name)]
    if cfg.preset == "quickstart" and given:
        p.error(f"--preset quickstart generates its own data and backbone, so it would ignore --{given[0]}; "
                "drop it, or use --preset coco for your own data")
    if cfg.preset != "quickstart":
        for name in GIVEN_PATHS:
            if not getattr(cfg, name):
                p.error(f"--preset {cfg.preset} needs --{name}")
            if not Path(getattr(cfg, name)).exists():
                p.error(f"--{name} {getattr(cfg, name)}: no such file or folder")
    return cfg


def main(cfg: PipelineConfig) -> int:
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir or f"runs/{cfg.preset}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir / "pipeline.json", cfg.preset)
    if cfg.preset == "quickstart":
        print(f"== quickstart in {run_dir}: the synthetic shapes dataset, a backbone pretrained on it (phase 0), then "
              "the six phases", flush=True)
        recipe = quickstart_recipe(run_dir, cfg.num_train, cfg.num_val, cfg.num_test)
    else:
        recipe = coco_recipe(Path(cfg.images_path), Path(cfg.captions_path), Path(cfg.backbone),
                             expansionnet_v2=cfg.preset == "coco-expansionnet-v2")
    recipe = apply_overrides(recipe, cfg.overrides)
    manifest.data["inputs"] = {"images_path": str(recipe.images_path), "captions_path": str(recipe.captions_path),
                               "backbone": str(recipe.backbone) if recipe.backbone else None}
    manifest.data["overrides"] = list(cfg.overrides)
    manifest.save()
    selected = parse_phases(cfg.phases) if cfg.phases else [p.number for p in recipe.phases()]
    outputs = run_phases(run_dir, recipe, selected, manifest)
    if cfg.preset == "quickstart" and cfg.report and 3 in outputs and 6 in outputs:
        print("== evaluating the XE (phase 3) and final (phase 6) checkpoints on the test split", flush=True)
        results = quickstart_report(run_dir, recipe.captions_path, recipe.images_path, outputs[3], outputs[6],
                                    manifest.data)
        g = results["grounded_final"]
        manifest.data["results"] = {"test_cider_xe": results["test_xe"]["metrics"]["CIDEr-D"],
                                    "test_cider_final": results["test_final"]["metrics"]["CIDEr-D"],
                                    "best_constant_cider": results["best_constant_cider"],
                                    **{k: g[k] for k in ("colour_named", "colour_accuracy", "shape_accuracy",
                                                         "count_when_named", "count_accuracy")}}
        manifest.save()
        r = manifest.data["results"]
        print(f"test CIDEr-D: {r['test_cider_xe']:.1f} after XE, {r['test_cider_final']:.1f} after SCST (best "
              f"constant caption {r['best_constant_cider']:.1f}); of the shape groups, colours named "
              f"{100 * r['colour_named']:.0f}%, colour + shape word right {100 * r['colour_accuracy']:.0f}%, number "
              f"right when the shape is named {100 * r['count_when_named']:.0f}%\nreport: {run_dir / 'report.md'}",
              flush=True)
    print(f"== done in {time.perf_counter() - t0:.0f} s; manifest: {run_dir / 'pipeline.json'}", flush=True)
    return 0


if __name__ == "__main__":
    plain_warnings()
    try:
        sys.exit(main(parse_config()))
    except (RuntimeError, FileNotFoundError, ValueError, OverrideError) as e:
        sys.exit(f"error: {e}")
