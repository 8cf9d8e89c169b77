"""The recipes' settings, written once: the seed's COCO recipe, the reference's ExpansionNet v2 recipe, the
quickstart on the embedded synthetic dataset, and the small recipe for your own photos (from a trained captioner,
a pretrained backbone or from scratch). Each is {phase: {flag: value}}; README's six commands are checked against
SEED_RECIPE by a test (tests/test_pipeline.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.check import check_dataset
from data.formats import CAPTION_FILE_KINDS, captions_kind, describe_kind, load_records
from data.records import DatasetError, ImageRecord
from data.report import plural
from data.splits import DEFAULT_SPLIT_RATIO, split_records
from data.synthetic import SyntheticConfig, generate_synthetic_dataset
from data.to_manifest import ManifestPlan, plan_manifest
from deploy.checkpoints import read_backbone_file, require_end_to_end, restore_model, save_model_checkpoint
from deploy.folder import is_model_folder, load_pretrained
from engine.pipeline import Recipe
from engine.pretrain import MIN_WORD_IMAGES, word_list
from models.config import DROPOUTS
from utils.checkpoint import CheckpointError, state_dict_sha256

PRESETS = ("quickstart", "small", "coco", "coco-expansionnet-v2")


def dropouts(p: float) -> dict[str, float]:
    """Every dropout of the captioner set to p (the recipes always set them together)."""
    return dict.fromkeys(DROPOUTS, p)


# the seed's six commands (seed-README.md), train phases; phases 1 and 4 run data_generator.py with its defaults
SEED_MODEL = {"model": "optimizer_expansionnet", "N_enc": 2, "N_dec": 2, "model_dim": 512}
SEED_COMMON = {"seed": 775533, "optim_type": "radam", "sched_type": "custom_warmup_anneal", "save_every_minutes": 60,
               "how_many_checkpoints": 1}
SEED_RECIPE: dict[int, dict[str, Any]] = {
    2: {"warmup": 10000, "lr": 2e-4, "anneal_coeff": 0.8, "anneal_every_epoch": 2, **dropouts(0.3), "batch_size": 48,
        "num_accum": 1, "print_every_iter": 11807, "eval_every_iter": 999999, "num_epochs": 8, "eval_beam_sizes": (3,)},
    3: {"warmup": 1, "lr": 3e-5, "anneal_coeff": 0.55, "anneal_every_epoch": 1, **dropouts(0.3), "batch_size": 8,
        "num_accum": 3, "print_every_iter": 15000, "eval_every_iter": 999999, "num_epochs": 2, "eval_beam_sizes": (3,)},
    5: {"warmup": 1, "lr": 1e-4, "anneal_coeff": 0.8, "anneal_every_epoch": 1, **dropouts(0.1), "batch_size": 8,
        "num_accum": 2, "print_every_iter": 4000, "eval_every_iter": 99999, "num_epochs": 9, "eval_beam_sizes": (5,)},
    6: {"warmup": 1, "lr": 2e-6, "anneal_coeff": 1.0, **dropouts(0.1), "batch_size": 4, "num_accum": 2,
        "print_every_iter": 15000, "eval_every_iter": 999999, "num_epochs": 1, "eval_beam_sizes": (5,)},
}
# the reference's recipe for ExpansionNet v2 (3 + 3 layers, Swin-L): README of jchenghu/ExpansionNet_v2
V2_MODEL = {"model": "expansionnet_v2", "N_enc": 3, "N_dec": 3, "model_dim": 512}
V2_RECIPE: dict[int, dict[str, Any]] = {
    2: SEED_RECIPE[2],
    3: {**SEED_RECIPE[3], "batch_size": 16},
    5: {**SEED_RECIPE[5], "batch_size": 24},
    6: {**SEED_RECIPE[6], "batch_size": 24},
}

# the quickstart: phase 0 pretrains a small backbone on the synthetic scenes (the stand-in for ImageNet weights), then
# a small captioner goes through the six phases, all on 2 CPU cores in about 10 minutes. No dropout in the XE phases:
# in 4 epochs of 4,000 images the captioner underfits rather than overfits (val CIDEr-D 234 instead of 227 after phase
# 2), and on the CPU drawing the dropout masks is 40% of a step. Phase 2 runs 6 epochs (val CIDEr-D still climbs: 252
# after 4, 259 after 6; colours named 96.1% after XE instead of 94.5%). SCST trades groups for CIDEr-D: at lr 1e-4
# for an epoch colours named fell 95.9% -> 94.5%, at 3e-5 96.1% -> 94.9%; 100 steps at 3e-5 gain +9 test CIDEr-D
# and keep them (96.3%) in 44 s. Phase 6 is 20 steps: a full epoch end to end changed val CIDEr-D by -3 to +2.
QUICKSTART_PHASE0 = {"init": "quickstart", "labels": "auto", "epochs": 4, "batch_size": 16, "lr": 5e-3}
QUICKSTART_MODEL = {"model": "optimizer_expansionnet", "N_enc": 2, "N_dec": 2, "model_dim": 96, "num_heads": 4,
                    "ff": 256, "num_exp_enc_list": (4, 8, 16), "num_exp_dec": 8, "memory_slots": 8}
QUICKSTART_COMMON = {"seed": 775533, "optim_type": "radam", "sched_type": "custom_warmup_anneal",
                     "save_every_minutes": 2, "how_many_checkpoints": 1, "eval_beam_sizes": (3,),
                     "print_every_iter": 50, "eval_every_iter": 999999, "num_workers": 1, "eval_batch_size": 100,
                     "eval_max_len": 20}
QUICKSTART_FEATURES = {"batch_size": 100, "num_workers": 1}
QUICKSTART_RECIPE: dict[int, dict[str, Any]] = {
    0: QUICKSTART_PHASE0,
    1: QUICKSTART_FEATURES,
    2: {"warmup": 20, "lr": 1e-3, "anneal_coeff": 0.8, "anneal_every_epoch": 1, **dropouts(0.0), "batch_size": 16,
        "grouped": True, "num_epochs": 6},
    3: {"warmup": 1, "lr": 1e-4, "anneal_coeff": 0.55, "anneal_every_epoch": 1, **dropouts(0.0), "batch_size": 16,
        "grouped": True, "num_epochs": 1},
    4: QUICKSTART_FEATURES,
    5: {"warmup": 1, "lr": 3e-5, "anneal_coeff": 0.8, "anneal_every_epoch": 1, **dropouts(0.0), "batch_size": 16,
        "num_epochs": 1, "max_steps": 100},
    6: {"warmup": 1, "lr": 3e-5, "anneal_coeff": 1.0, **dropouts(0.0), "batch_size": 16, "num_epochs": 1,
        "max_steps": 20},
}


def phase_settings(model: Mapping[str, Any], common: Mapping[str, Any], phases: Mapping[int, Mapping[str, Any]]
                   ) -> dict[int, dict[str, Any]]:
    """Every phase's settings: train phases get the model and the common settings, the others their own (phases 1
    and 4 are always there; phase 0 only when the preset pretrains its backbone)."""
    out: dict[int, dict[str, Any]] = {1: {}, 4: {}}
    for number, own in phases.items():
        out[number] = {**model, **common, **own} if number in (2, 3, 5, 6) else dict(own)
    return out


def quickstart_recipe(run_dir: Path, num_train: int = 4000, num_val: int = 500, num_test: int = 500,
                      seed: int = 0) -> Recipe:
    """Generate the synthetic dataset (once); phase 0 makes the backbone; the quickstart settings."""
    data_dir = run_dir / "data"
    captions = generate_synthetic_dataset(
        data_dir, SyntheticConfig(num_train=num_train, num_val=num_val, num_test=num_test, image_size=64, seed=seed))
    return Recipe(data_dir, captions, None, phase_settings(QUICKSTART_MODEL, QUICKSTART_COMMON, QUICKSTART_RECIPE))


def coco_recipe(images_path: Path, captions_path: Path, backbone: Path, expansionnet_v2: bool) -> Recipe:
    """The full recipes: the seed's Optimizer-ExpansionNet (2 + 2 layers, SwinV2-B) or the reference's v2."""
    model, phases = (V2_MODEL, V2_RECIPE) if expansionnet_v2 else (SEED_MODEL, SEED_RECIPE)
    return Recipe(images_path, captions_path, backbone, phase_settings(model, SEED_COMMON, phases))


# --preset small: your own photos and captions (a few hundred images). The quickstart's model and backbone; phase 0
# learns the captions' words (the only labels own data has) at the quickstart's 64 px; each phase sees its few hundred
# images for more epochs than the quickstart's 4,000, with fewer iterations in total, a short warm-up, and validation
# at each epoch's end (as every train.py run does). Images load in the training process (num_workers 0): with a few
# batches per epoch, starting a loader process each epoch and each validation costs more than it saves.
SMALL_PHASE0 = {**QUICKSTART_PHASE0, "labels": "words", "epochs": 20, "lr": 5e-3}
SMALL_COMMON = {**QUICKSTART_COMMON, "print_every_iter": 20, "num_workers": 0}
SMALL_FEATURES = {**QUICKSTART_FEATURES, "num_workers": 0}
SMALL_RECIPE: dict[int, dict[str, Any]] = {
    0: SMALL_PHASE0,
    1: SMALL_FEATURES,
    2: {**QUICKSTART_RECIPE[2], "warmup": 10, "lr": 1e-3, **dropouts(0.2), "anneal_coeff": 0.8,
        "anneal_every_epoch": 3, "num_epochs": 15},
    # on 300 images, lr 3e-4 end to end and 2e-4 in SCST on features lowered val CIDEr-D (82.7 -> 76, -> 68)
    3: {**QUICKSTART_RECIPE[3], "lr": 1e-4, **dropouts(0.2), "anneal_coeff": 0.7, "num_epochs": 3},
    4: SMALL_FEATURES,
    5: {**QUICKSTART_RECIPE[5], "lr": 1e-4, "anneal_every_epoch": 2, "num_epochs": 6, "max_steps": 0},
    6: {**QUICKSTART_RECIPE[6], "lr": 2e-5, "num_epochs": 2, "max_steps": 0},
}
SMALL_MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class OwnData:
    """Where the small preset's data is: the images folder and captions file the scripts get (a converted captions
    file's manifest, written in the run's data/ folder, or the manifest or Karpathy json given), and the summary."""

    images_path: Path
    captions_path: Path
    summary: str
    converted: bool


def prepare_own_data(images_path: Path, captions_path: Path, data_dir: Path, skip_missing: bool = False,
                     split_ratio: str = "", seed: int = 0) -> OwnData:
    """Validate the data in one pass (the summary is printed) and make a manifest of a captions file (CSV, TSV,
    JSON) in data_dir, splits drawn at random (split_ratio, default 0.9,0.05,0.05); a manifest or Karpathy json is
    used as is. Problems that would stop a phase (missing images unless skip_missing, images without captions, no
    training images, too few for phase 0's words) raise DatasetError before anything runs."""
    kind = captions_kind(captions_path)
    if kind in CAPTION_FILE_KINDS:
        ratio = split_ratio or ",".join(f"{share:g}" for share in DEFAULT_SPLIT_RATIO)
        if not split_ratio:
            print(f"{captions_path.name} assigns no splits, so the images are drawn at random into train, val and test "
                  f"{ratio} (seed {seed}; --split_ratio chooses other shares)", flush=True)
        plan = plan_manifest(images_path, captions_path, split_ratio=ratio, seed=seed, skip_missing=skip_missing)
        print(plan.report.text(), flush=True)
        if plan.blocking:
            raise DatasetError(f"{captions_path}: {plan.blocking.replace('nothing written', 'nothing run')}")
        _require_trainable([ImageRecord(i, images_path / name, captions, split)
                            for i, (name, captions, split) in enumerate(plan.entries)], captions_path)
        manifest = _write_manifest(plan, data_dir / SMALL_MANIFEST)
        return OwnData(data_dir, manifest, plan.report.text(), converted=True)
    if kind in ("manifest", "karpathy", "karpathy-folder"):
        if split_ratio:
            raise DatasetError(f"--split_ratio: {captions_path} is {describe_kind(kind)} with its own splits; "
                               "split_ratio applies to captions files (CSV, TSV, JSON)")
        report = check_dataset(captions_path, images_path)
        print(report.text(), flush=True)
        if report.severe:
            raise DatasetError(f"{captions_path}: {', '.join(report.title(k) for k in report.severe)}; fix these "
                               "(the summary above says where), then run again")
        _require_trainable(load_records(captions_path, images_path), captions_path)
        return OwnData(images_path, captions_path, report.text(), converted=False)
    raise DatasetError(f"{captions_path}: this is {describe_kind(kind)}; --captions_path takes a captions CSV "
                       "(image,caption), TSV, JSON {\"file.jpg\": [captions]}, a manifest (.jsonl) or Karpathy's json")


def _write_manifest(plan: ManifestPlan, target: Path) -> Path:
    """Write the plan's manifest. An earlier run's different manifest is replaced while no phase has started in the
    run folder (target's grandparent), else refused: the phases there used it."""
    fresh = plan.write(target.with_name(target.name + ".new"), overwrite=True)
    if target.exists() and target.read_bytes() != fresh.read_bytes():
        started = sorted(p.name for p in target.parent.parent.glob("phase*") if p.is_dir())
        if started:
            fresh.unlink()
            raise DatasetError(f"{target} (written by an earlier run in this folder) differs from what the images and "
                               f"captions give now, and {started[0]} used it; use another --run_dir")
        print(f"replacing {target}: the images or captions changed since an earlier run, which started no phase",
              flush=True)
    os.replace(fresh, target)
    print(f"wrote {plural(len(plan.entries), 'image')} to {target}", flush=True)
    return target


def _require_trainable(records: list[ImageRecord], source: Path) -> None:
    """Training images, and words for phase 0 (each naming at least MIN_WORD_IMAGES of them)."""
    train = split_records(records)["train"]
    if not train:
        raise DatasetError(f"{source}: no training images, nothing to train on")
    if not word_list(train):
        raise DatasetError(f"{source}: no caption word names at least {MIN_WORD_IMAGES} of the "
                           f"{len(train)} training images (and not all of them), so phase 0 has nothing to learn; "
                           "add images or captions")


# --preset small --init_from: fine-tune a trained captioner. Its architecture and backbone are kept (the features are
# extracted with its own backbone, at its image size and normalisation); no phase 0; the captions' new words join its
# vocabulary (train.py --init_from). Shorter, gentler schedules than from scratch: the model already captions.
# Measured on 300 shifted-domain synthetic images (240 train) from the quickstart's captioner, 2 CPU cores
# (docs/benchmarks.md, "Fine-tuning on your photos"): phase 2 at 6 epochs never beat the start on val, so best.pth kept
# the start (test colour + shape 34%); at 15 epochs test colour + shape 52%. The new colours and shapes need the
# backbone to learn them: phase 3 (end to end) at lr 1e-4 for one epoch never beat phase 2 on val; at lr 1e-3 for 40
# epochs (anneal 0.93 per epoch) the run ends at 66% (CIDEr-D 195, start 169), keeping 92% of the quickstart's own
# colour + shape figure, in 282 s. Over two seeds and 800 test images it averages 75-79%; a lower or higher backbone
# learning rate, more or no dropout, flips and a longer phase 3 measured no better (docs/benchmarks.md, fourth
# round), while 480 training images reach 86%. On a large captioner (Swin-L at 384 px) phase 3 is most of the time:
# shorten it with --set phase3.num_epochs=N.
FINETUNE_RECIPE: dict[int, dict[str, Any]] = {
    1: SMALL_FEATURES,
    2: {**SMALL_RECIPE[2], "warmup": 10, "lr": 1e-3, **dropouts(0.1), "anneal_coeff": 0.8, "anneal_every_epoch": 3,
        "num_epochs": 15},
    3: {**SMALL_RECIPE[3], "lr": 1e-3, **dropouts(0.1), "anneal_coeff": 0.93, "anneal_every_epoch": 1,
        "num_epochs": 40},
    4: SMALL_FEATURES,
    5: {**SMALL_RECIPE[5], "lr": 1e-4, "num_epochs": 2},
    6: {**SMALL_RECIPE[6], "lr": 2e-5, "num_epochs": 1},
}
START_FOLDER = "start"  # run_dir/start/captioner.pth: the captioner a fine-tuning run starts from, in our format


def small_recipe(images_path: Path, captions_path: Path, run_dir: Path, skip_missing: bool = False,
                 split_ratio: str = "", seed: int = 0, init_from: Path | None = None, vocab: Path | None = None,
                 backbone: Path | None = None) -> Recipe:
    """Your own photos: the data prepared in run_dir/data (prepare_own_data), then the phases from the best start
    given: a trained captioner (init_from, fine-tuned with FINETUNE_RECIPE), else a pretrained backbone file (the six
    phases with the quickstart's captioner on its features), else from scratch (phase 0: the quickstart's backbone
    learns the captions' words, then the six phases); Recipe.start says which."""
    data = prepare_own_data(Path(images_path), Path(captions_path), Path(run_dir) / "data", skip_missing, split_ratio,
                            seed)
    if init_from is not None:
        start, what = prepare_start(Path(init_from), vocab, Path(run_dir))
        settings = phase_settings({}, SMALL_COMMON, FINETUNE_RECIPE)
        settings[2]["init_from"] = str(start)
        return Recipe(data.images_path, data.captions_path, start, settings,
                      start=f"fine-tuning the trained captioner {init_from} ({what}; saved as {start})")
    if backbone is not None:
        bb, _ = read_backbone_file(backbone)
        return Recipe(data.images_path, data.captions_path, Path(backbone),
                      phase_settings(QUICKSTART_MODEL, SMALL_COMMON, {n: v for n, v in SMALL_RECIPE.items() if n}),
                      start=f"the pretrained backbone {backbone} ({bb.name}, {bb.img_size} px), a new captioner on "
                            "its features (no phase 0)")
    return Recipe(data.images_path, data.captions_path, None, phase_settings(QUICKSTART_MODEL, SMALL_COMMON,
                                                                           SMALL_RECIPE),
                  start="from scratch: phase 0 pretrains the quickstart's backbone on the captions' words (give "
                        "--init_from a trained captioner, or --backbone a pretrained backbone, to start further on)")


def prepare_start(init_from: Path, vocab: Path | None, run_dir: Path) -> tuple[Path, str]:
    """The captioner to fine-tune (our checkpoint, a model folder, or the official ExpansionNet v2 checkpoint with
    its vocabulary) written once as our end-to-end checkpoint in run_dir/start/, which every phase reads: its
    backbone extracts the features. Returns the file and a description. A run folder keeps the start it was made
    with: another one is refused."""
    target = run_dir / START_FOLDER / "captioner.pth"
    if is_model_folder(init_from):
        if vocab is not None:
            raise CheckpointError(f"--vocab: {init_from} is a model folder with its own vocab.json; drop --vocab")
        model, config, words = load_pretrained(init_from)
        kind = "a model folder"
    else:
        restored = restore_model(init_from, vocab_path=vocab)
        model, config, words = restored.model, restored.config, restored.vocab
        kind = "the official ExpansionNet v2 checkpoint" if restored.official else "a checkpoint"
    require_end_to_end(config, init_from, purpose="extract your photos' features with its backbone")
    digest = state_dict_sha256(model.state_dict())
    what = (f"{kind}: {config.name}, {config.N_enc} + {config.N_dec} layers, {len(words)} words, backbone "
            f"{config.backbone.name} at {config.backbone.img_size} px")
    if target.exists():
        kept = restore_model(target)
        if state_dict_sha256(kept.model.state_dict()) != digest or kept.vocab != words:
            raise CheckpointError(f"{run_dir} was started from another captioner ({kept.checkpoint.get('source')}) "
                                  f"than --init_from {init_from}; use another --run_dir")
        return target, what
    save_model_checkpoint(target, model, config, words, source=str(init_from))
    print(f"wrote the starting captioner ({what}) to {target}", flush=True)
    return target, what


# Seconds per image on 2 CPU cores (the quickstart's captioner and backbone at 64 px) of each kind of work of the small
# preset, measured on a quiet 2-core Intel Xeon (2026-12-06; docs/benchmarks.md, "Fine-tuning on your photos"): a
# training epoch per training image, each epoch's validation included (20 val images per 240 training images, so the
# val_* entries stay 0), feature extraction per image, and the report per test image (the starting, XE and final
# captioner) on top of REPORT_SECONDS (one METEOR JVM, the best-constant-caption search, the old data's 500 test images
# twice). From the phase durations of `pipeline.py --preset small --init_from` (quickstart captioner, 300
# shifted-domain images, 282 s in all; phases 1 and 4 4.7 and 4.4 s for 300 images, 2 58.8 s for 15 epochs, 3 154.7 s
# for 40, 5 10.7 s for 2, 6 8.5 s for 1) and phase 0 of the same images from scratch (18.6 s for 20 epochs); the report
# from the same run with 400 test images (2026-12-07: 29 s after 305 s of phases). On a shared machine the same runs
# took 2 to 6 times as long: the estimate is a floor there.
SECONDS_PER_IMAGE = {"phase0": 0.004, "features": 0.016, "xe_features": 0.016, "xe_e2e": 0.016, "scst_features": 0.02,
                     "scst_e2e": 0.03, "val_features": 0.0, "val_e2e": 0.0, "report": 0.04}
REPORT_SECONDS = 15.0
PHASE_WORK = {2: "xe_features", 3: "xe_e2e", 5: "scst_features", 6: "scst_e2e"}


def time_estimate(recipe: Recipe, selected: list[int]) -> str:
    """A sentence: the selected phases' expected minutes for this data's split sizes, from SECONDS_PER_IMAGE and
    REPORT_SECONDS."""
    sizes = {k: len(v) for k, v in split_records(load_records(recipe.captions_path, recipe.images_path)).items()}
    total = 0.0
    for number in selected:
        settings = recipe.settings.get(number)
        if settings is None:
            continue
        if number == 0:
            total += settings.get("epochs", 3) * sizes["train"] * SECONDS_PER_IMAGE["phase0"]
        elif number in (1, 4):
            total += sum(sizes.values()) * SECONDS_PER_IMAGE["features"]
        else:
            e2e = number in (3, 6)
            epochs = settings.get("num_epochs", 1)
            total += epochs * (sizes["train"] * SECONDS_PER_IMAGE[PHASE_WORK[number]]
                               + sizes["val"] * SECONDS_PER_IMAGE["val_e2e" if e2e else "val_features"])
    total += REPORT_SECONDS + sizes["test"] * SECONDS_PER_IMAGE["report"]
    return (f"expected time: about {max(1, round(total / 60))} minutes for {sizes['train']} training, {sizes['val']} "
            f"val and {sizes['test']} test images (measured per image on 2 CPU cores with the quickstart's captioner "
            "at 64 px: a larger captioner or larger images take longer, a GPU less)")


def schedule_help() -> str:
    """--help's epilog: each small-preset start's phases with their epochs and learning rates."""

    def line(name: str, recipe: dict[int, dict[str, Any]]) -> str:
        parts = []
        for number, settings in recipe.items():
            if number == 0:
                parts.append(f"0: {settings['epochs']} epochs at lr {settings['lr']:g}")
            elif number in PHASE_WORK:
                parts.append(f"{number}: {settings['num_epochs']} epochs at lr {settings['lr']:g}")
        return f"  {name}: phases " + "; ".join(parts)

    return "\n".join(["--preset small, the phases by start (--set phaseN.key=value changes one):",
                      line("from scratch", SMALL_RECIPE),
                      line("--backbone FILE", {n: v for n, v in SMALL_RECIPE.items() if n}),
                      line("--init_from CAPTIONER", FINETUNE_RECIPE)])
