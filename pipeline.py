"""Run the whole recipe in one command, each phase in its own folder; run it again to resume.

    python pipeline.py --preset quickstart                     # synthetic data, tiny models, CPU, a few minutes
    python pipeline.py --preset small --images_path photos/ --captions_path captions.csv --run_dir runs/mine
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
from engine.pipeline import Manifest, Recipe, parse_phases, run_phases
from engine.presets import PRESETS, coco_recipe, quickstart_recipe, small_recipe
from engine.report import own_data_report, quickstart_report
from utils.cli import ArgumentParser, add_dataclass_flags, dataclass_values, plain_warnings
from utils.fields import option

GIVEN_PATHS = ("images_path", "captions_path", "backbone")
# the paths each preset reads (the others would be ignored, so they are refused)
PRESET_PATHS = {"quickstart": (), "small": ("images_path", "captions_path")}


@dataclass(frozen=True)
class PipelineConfig:
    """Every pipeline.py setting."""

    preset: str = option("quickstart", "which recipe", choices=PRESETS, required=True, group="data")
    images_path: str = option("", "image folder (small and coco presets)", group="data")
    captions_path: str = option("", "Karpathy json or manifest (coco presets); small also takes a captions CSV "
                                "(image,caption), TSV or JSON {\"file.jpg\": [captions]}", group="data")
    backbone: str = option("", "backbone weights: SwinV2-B for coco, Swin-L for coco-expansionnet-v2", group="model")
    skip_missing: bool = option(False, "small: leave out caption rows whose image is not in --images_path (default: "
                                "refuse to run)", aliases=("--skip-missing",), group="data")
    split_ratio: str = option("", "small, with a captions file: random train,val,test shares (default 0.9,0.05,0.05)",
                              aliases=("--split-ratio",), group="data")
    num_train: int = option(4000, "quickstart: synthetic training images", group="data")
    num_val: int = option(500, "quickstart: synthetic validation images", group="data")
    num_test: int = option(500, "quickstart: synthetic test images", group="data")
    overrides: tuple[str, ...] = option((), "change a setting of every phase that has it (key=value) or of one "
                                        "phase (phaseN.key=value); repeatable, recorded in pipeline.json",
                                        flag="set", nargs="+", group="optimisation")
    run_dir: str = option("", "where every phase gets its folder (default: runs/<preset>)", group="runtime")
    phases: str = option("", "subset of the phases to run, e.g. 2-5 (their inputs must exist; default: all)",
                         group="runtime")
    report: bool = option(True, "quickstart and small: evaluate on the test split and write report.md",
                          group="runtime")


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
    wanted = PRESET_PATHS.get(cfg.preset, GIVEN_PATHS)
    ignored = [name for name in GIVEN_PATHS if getattr(cfg, name) and name not in wanted]
    if ignored:
        what = ("generates its own data and backbone" if cfg.preset == "quickstart" else
                "makes its own backbone (phase 0)")
        hint = "use --preset small (or coco) for your own data" if cfg.preset == "quickstart" else \
            f"start phase 0 from that file with --set phase0.init={getattr(cfg, ignored[0])}"
        p.error(f"--preset {cfg.preset} {what}, so it would ignore --{ignored[0]}; drop it, or {hint}")
    for name in wanted:
        if not getattr(cfg, name):
            p.error(f"--preset {cfg.preset} needs --{name}")
        if not Path(getattr(cfg, name)).exists():
            p.error(f"--{name} {getattr(cfg, name)}: no such file or folder")
    if cfg.preset != "small":
        for flag in ("skip_missing", "split_ratio"):
            if getattr(cfg, flag):
                p.error(f"--{flag} is for --preset small (it prepares your captions file); --preset {cfg.preset} "
                        "would ignore it")
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
    elif cfg.preset == "small":
        print(f"== your own photos in {run_dir}: the captions checked (and made a manifest), a backbone pretrained on "
              "their words (phase 0), then the six phases", flush=True)
        recipe = small_recipe(Path(cfg.images_path), Path(cfg.captions_path), run_dir, cfg.skip_missing,
                              cfg.split_ratio)
    else:
        recipe = coco_recipe(Path(cfg.images_path), Path(cfg.captions_path), Path(cfg.backbone),
                             expansionnet_v2=cfg.preset == "coco-expansionnet-v2")
    recipe = apply_overrides(recipe, cfg.overrides)
    manifest.data["inputs"] = {"images_path": str(recipe.images_path), "captions_path": str(recipe.captions_path),
                               "backbone": str(recipe.backbone) if recipe.backbone else None}
    if cfg.preset == "small":
        manifest.data["inputs"]["given"] = {"images_path": str(Path(cfg.images_path).resolve()),
                                            "captions_path": str(Path(cfg.captions_path).resolve()),
                                            "skip_missing": cfg.skip_missing, "split_ratio": cfg.split_ratio or None}
    manifest.data["overrides"] = list(cfg.overrides)
    manifest.save()
    selected = parse_phases(cfg.phases) if cfg.phases else [p.number for p in recipe.phases()]
    outputs = run_phases(run_dir, recipe, selected, manifest)
    if cfg.report and 3 in outputs and 6 in outputs:
        if cfg.preset == "quickstart":
            _quickstart_results(run_dir, recipe, outputs, manifest)
        elif cfg.preset == "small":
            _own_data_results(run_dir, recipe, outputs, manifest)
    print(f"== done in {time.perf_counter() - t0:.0f} s; manifest: {run_dir / 'pipeline.json'}", flush=True)
    if 6 in outputs and outputs[6].exists():
        final = outputs[6]
        print(f"== to caption images use phase 6's end-to-end checkpoint {final}: python demo.py --load_path {final} "
              f"--image_paths photo.jpg, or CAPTION_CHECKPOINT={final} uvicorn api:app", flush=True)
    return 0


def _quickstart_results(run_dir: Path, recipe: Recipe, outputs: dict[int, Path], manifest: Manifest) -> None:
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


def _own_data_results(run_dir: Path, recipe: Recipe, outputs: dict[int, Path], manifest: Manifest) -> None:
    print("== evaluating the XE (phase 3) and final (phase 6) checkpoints on the test split", flush=True)
    results = own_data_report(run_dir, recipe.captions_path, recipe.images_path, outputs[3], outputs[6],
                              manifest.data)
    if "test_final" in results:
        manifest.data["results"] = {"test_cider_xe": results["test_xe"]["metrics"]["CIDEr-D"],
                                    "test_cider_final": results["test_final"]["metrics"]["CIDEr-D"],
                                    "best_constant_cider": results["best_constant_cider"]}
        r = manifest.data["results"]
        print(f"test CIDEr-D: {r['test_cider_xe']:.1f} after XE, {r['test_cider_final']:.1f} after SCST (best "
              f"constant caption {r['best_constant_cider']:.1f})", flush=True)
    else:
        manifest.data["results"] = {}
        print("no test split: nothing scored; the report shows val images with their captions", flush=True)
    manifest.save()
    print(f"report: {run_dir / 'report.md'}", flush=True)


if __name__ == "__main__":
    plain_warnings()
    try:
        sys.exit(main(parse_config()))
    except (RuntimeError, FileNotFoundError, ValueError, OverrideError) as e:
        sys.exit(f"error: {e}")
