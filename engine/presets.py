"""The recipes' settings, written once: the seed's COCO recipe, the reference's ExpansionNet v2 recipe, and the
quickstart on the embedded synthetic dataset. Each is {phase: {flag: value}}; README's six commands are checked
against SEED_RECIPE by a test (tests/test_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data.synthetic import SyntheticConfig, generate_synthetic_dataset
from engine.pipeline import Recipe
from models.config import DROPOUTS

PRESETS = ("quickstart", "coco", "coco-expansionnet-v2")


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
# a small captioner goes through the six phases, all on 2 CPU cores in a few minutes
QUICKSTART_PHASE0 = {"init": "quickstart", "labels": "auto", "epochs": 3, "batch_size": 16, "lr": 5e-3}
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
    2: {"warmup": 20, "lr": 1e-3, "anneal_coeff": 0.8, "anneal_every_epoch": 1, **dropouts(0.1), "batch_size": 16,
        "grouped": True, "num_epochs": 3},
    3: {"warmup": 1, "lr": 3e-4, "anneal_coeff": 0.55, "anneal_every_epoch": 1, **dropouts(0.1), "batch_size": 16,
        "grouped": True, "num_epochs": 1},
    4: QUICKSTART_FEATURES,
    5: {"warmup": 1, "lr": 2e-4, "anneal_coeff": 0.8, "anneal_every_epoch": 1, **dropouts(0.0), "batch_size": 16,
        "num_epochs": 2},
    6: {"warmup": 1, "lr": 2e-5, "anneal_coeff": 1.0, **dropouts(0.0), "batch_size": 16, "num_epochs": 1},
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
