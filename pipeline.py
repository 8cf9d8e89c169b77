"""Run the whole recipe in one command, each phase in its own folder; run it again to resume.

    python pipeline.py --preset quickstart                     # synthetic data, tiny models, CPU, a few minutes
    python pipeline.py --preset small --images_path photos/ --captions_path captions.csv --run_dir runs/mine
    python pipeline.py --preset small --init_from runs/quickstart/phase6-scst-e2e/best.pth \\
        --images_path photos/ --captions_path captions.csv --run_dir runs/mine   # fine-tune a trained captioner
    python pipeline.py --preset coco --images_path coco/ --captions_path dataset_coco.json \\
        --backbone swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth --run_dir runs/coco
    python pipeline.py --preset coco ... --set phase2.num_epochs=1 --set lr=1e-4     # overrides, recorded
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.checkpoints import CheckpointError
from engine.overrides import OverrideError, apply_overrides
from engine.pipeline import Manifest, Recipe, parse_phases, plan_phases, run_phases
from engine.presets import PRESETS, coco_recipe, quickstart_recipe, schedule_help, small_recipe, time_estimate
from engine.report import own_data_report, quickstart_report
from utils.cli import ArgumentParser, add_dataclass_flags, dataclass_values, plain_warnings
from utils.fields import option

GIVEN_PATHS = ("images_path", "captions_path", "backbone")
# the paths each preset needs (the others would be ignored, so they are refused)
PRESET_PATHS = {"quickstart": (), "small": ("images_path", "captions_path")}
OPTIONAL_PATHS = {"small": ("backbone", "init_from", "vocab", "old_captions_path", "old_images_path")}


@dataclass(frozen=True)
class PipelineConfig:
    """Every pipeline.py setting."""

    preset: str = option("quickstart", "which recipe", choices=PRESETS, required=True, group="data")
    images_path: str = option("", "image folder (small and coco presets)", group="data")
    captions_path: str = option("", "Karpathy json or manifest (coco presets); small also takes a captions CSV "
                                "(image,caption), TSV or JSON {\"file.jpg\": [captions]}", group="data")
    backbone: str = option("", "backbone weights: SwinV2-B for coco, Swin-L for coco-expansionnet-v2; small: a "
                           "pretrained backbone file (backbone.py create --timm NAME --pretrained) to start from "
                           "instead of phase 0", group="model")
    init_from: str = option("", "small: fine-tune this trained captioner (our checkpoint, a model folder, or the "
                            "official ExpansionNet v2 checkpoint with --vocab) instead of training one; its "
                            "architecture and backbone are kept, the captions' new words join its vocabulary",
                            group="model")
    vocab: str = option("", "small with --init_from the official checkpoint: its vocabulary "
                        "(demo_coco_tokens.pickle)", group="model")
    old_captions_path: str = option("", "small with --init_from: the starting model's own data (a captions path "
                                    "with a test split); the report scores the starting and the fine-tuned model "
                                    "on its test split, to show what fine-tuning forgot", group="data")
    old_images_path: str = option("", "the image folder of --old_captions_path (default: beside it)", group="data")
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
    rerun_changed: bool = option(False, "rerun finished phases whose command differs from the one they ran with (and "
                                 "the phases reading them), keeping their earlier folders under run_dir/replaced/; "
                                 "by default such a run is refused with the differences listed", group="runtime")


def parse_config(argv: list[str] | None = None) -> PipelineConfig:
    p = ArgumentParser(description=__doc__, epilog=schedule_help())
    add_dataclass_flags(p, PipelineConfig)
    p.group("runtime").add_argument("--no_report", dest="report", action="store_false", help="same as --report False")
    args = p.parse_args(argv)
    cfg = PipelineConfig(**dataclass_values(args, PipelineConfig))
    try:
        parse_phases(cfg.phases or "0-6")
    except ValueError as e:
        p.error(str(e))
    wanted = PRESET_PATHS.get(cfg.preset, GIVEN_PATHS)
    optional = OPTIONAL_PATHS.get(cfg.preset, ())
    for name in optional:
        if getattr(cfg, name) and not Path(getattr(cfg, name)).exists():
            p.error(f"--{name} {getattr(cfg, name)}: no such file or folder")
    if cfg.init_from and cfg.backbone:
        p.error("--init_from fine-tunes a captioner with its own backbone, so --backbone would be ignored; drop one")
    needs_init = [name for name in ("vocab", "old_captions_path", "old_images_path") if getattr(cfg, name)]
    if needs_init and not cfg.init_from:
        p.error(f"--{needs_init[0]} belongs to a fine-tuning run: give --init_from the captioner to start from")
    if cfg.old_images_path and not cfg.old_captions_path:
        p.error("--old_images_path needs --old_captions_path (the captions of the starting model's data)")
    given_small = [name for name in ("init_from", "vocab", "old_captions_path", "old_images_path")
                   if getattr(cfg, name) and name not in optional]
    if given_small:
        p.error(f"--{given_small[0]} is for --preset small (fine-tuning a captioner on your photos); --preset "
                f"{cfg.preset} would ignore it")
    ignored = [name for name in GIVEN_PATHS if getattr(cfg, name) and name not in (*wanted, *optional)]
    if ignored:
        p.error(f"--preset {cfg.preset} generates its own data and backbone, so it would ignore --{ignored[0]}; "
                "drop it, or use --preset small (or coco) for your own data")
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
    recipe = apply_overrides(build_recipe(cfg, run_dir), cfg.overrides)
    selected = parse_phases(cfg.phases) if cfg.phases else [p.number for p in recipe.phases()]
    again = plan_phases(run_dir, recipe, selected, manifest, cfg.rerun_changed)  # refuses before anything runs
    if recipe.start:
        print(f"== start: {recipe.start}", flush=True)
    if cfg.preset == "small":
        print(f"== {time_estimate(recipe, selected)}", flush=True)
    manifest.data["inputs"] = {"images_path": str(recipe.images_path), "captions_path": str(recipe.captions_path),
                               "backbone": str(recipe.backbone) if recipe.backbone else None}
    if cfg.preset == "small":
        paths = ("images_path", "captions_path", *OPTIONAL_PATHS["small"])
        manifest.data["inputs"]["given"] = {
            **{k: str(Path(getattr(cfg, k)).resolve()) for k in paths if getattr(cfg, k)},
            "skip_missing": cfg.skip_missing, "split_ratio": cfg.split_ratio or None}
        manifest.data["inputs"]["start"] = recipe.start
    manifest.save()
    outputs = run_phases(run_dir, recipe, selected, manifest, again=again, overrides=cfg.overrides)
    if cfg.report and 3 in outputs and 6 in outputs:
        if cfg.preset == "quickstart":
            _quickstart_results(run_dir, recipe, outputs, manifest)
        elif cfg.preset == "small":
            _own_data_results(cfg, run_dir, recipe, outputs, manifest)
    print(f"== done in {time.perf_counter() - t0:.0f} s; manifest: {run_dir / 'pipeline.json'}", flush=True)
    if 6 in outputs and outputs[6].exists():
        final = outputs[6]
        print(f"== to caption images use phase 6's end-to-end checkpoint {final}: python demo.py --load_path {final} "
              f"--image_paths photo.jpg, or CAPTION_CHECKPOINT={final} uvicorn api:app", flush=True)
    return 0


def build_recipe(cfg: PipelineConfig, run_dir: Path) -> Recipe:
    """The preset's recipe for this run (the quickstart generates its data; small checks and converts yours)."""
    if cfg.preset == "quickstart":
        print(f"== quickstart in {run_dir}: the synthetic shapes dataset, a backbone pretrained on it (phase 0), then "
              "the six phases", flush=True)
        return quickstart_recipe(run_dir, cfg.num_train, cfg.num_val, cfg.num_test)
    if cfg.preset == "small":
        print(f"== your own photos in {run_dir}: the captions checked (and made a manifest), then the phases",
              flush=True)
        return small_recipe(Path(cfg.images_path), Path(cfg.captions_path), run_dir, cfg.skip_missing,
                            cfg.split_ratio, init_from=Path(cfg.init_from) if cfg.init_from else None,
                            vocab=Path(cfg.vocab) if cfg.vocab else None,
                            backbone=Path(cfg.backbone) if cfg.backbone else None)
    return coco_recipe(Path(cfg.images_path), Path(cfg.captions_path), Path(cfg.backbone),
                       expansionnet_v2=cfg.preset == "coco-expansionnet-v2")


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


def _own_data_results(cfg: PipelineConfig, run_dir: Path, recipe: Recipe, outputs: dict[int, Path],
                      manifest: Manifest) -> None:
    print("== evaluating the XE (phase 3) and final (phase 6) checkpoints on the test split"
          + (" beside the starting captioner" if cfg.init_from else ""), flush=True)
    old_data = None
    if cfg.old_captions_path:
        old_data = (Path(cfg.old_captions_path), Path(cfg.old_images_path or Path(cfg.old_captions_path).parent))
    results = own_data_report(run_dir, recipe.captions_path, recipe.images_path, outputs[3], outputs[6],
                              manifest.data, start_checkpoint=recipe.backbone if cfg.init_from else None,
                              old_data=old_data)
    r: dict = {}
    if "test_final" in results:
        r = {"test_cider_xe": results["test_xe"]["metrics"]["CIDEr-D"],
             "test_cider_final": results["test_final"]["metrics"]["CIDEr-D"],
             "best_constant_cider": results["best_constant_cider"], "test_images": results["test_final"]["num_images"]}
        if "test_start" in results:
            r["test_cider_start"] = results["test_start"]["metrics"]["CIDEr-D"]
        for key, g in results.get("grounded", {}).items():
            r[f"colour_shape_{key}"] = g["colour_accuracy"]
    old = results.get("old_data")
    if old:
        for key in ("start", "final"):
            r[f"old_test_cider_{key}"] = old[key]["metrics"]["CIDEr-D"]
        for key, g in old.get("grounded", {}).items():
            r[f"old_colour_shape_{key}"] = g["colour_accuracy"]
    manifest.data["results"] = r
    manifest.save()
    print("== verdict\n" + "\n".join(results["verdict"]) + f"\nreport: {run_dir / 'report.md'}", flush=True)


if __name__ == "__main__":
    plain_warnings()
    try:
        sys.exit(main(parse_config()))
    except (RuntimeError, FileNotFoundError, ValueError, OverrideError, CheckpointError) as e:
        sys.exit(f"error: {e}")
