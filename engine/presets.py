"""Pipeline presets: the quickstart on the embedded synthetic dataset, the seed's COCO recipe and the reference's."""

from __future__ import annotations

from pathlib import Path

import torch

from data.synthetic import SyntheticConfig, generate_synthetic_dataset
from engine.checkpoints import save_backbone_file
from engine.pipeline import RecipeInputs
from models import tiny_swinv2
from models.backbone import create_backbone

PRESETS = ("quickstart", "coco", "coco-expansionnet-v2")

# the quickstart's captioner and backbone: small enough for all six phases on 2 CPU cores in a few minutes
QUICKSTART_MODEL = ["--model", "optimizer_expansionnet", "--N_enc", "2", "--N_dec", "2", "--model_dim", "96",
                    "--num_heads", "4", "--ff", "256", "--num_exp_enc_list", "4,8,16", "--num_exp_dec", "8",
                    "--memory_slots", "8"]
QUICKSTART_COMMON = ["--seed", "775533", "--optim_type", "radam", "--sched_type", "custom_warmup_anneal",
                     "--save_every_minutes", "2", "--how_many_checkpoints", "1", "--eval_beam_sizes", "[3]",
                     "--print_every_iter", "50", "--eval_every_iter", "999999", "--num_workers", "1",
                     "--eval_batch_size", "100"]
QUICKSTART_PHASES = {
    1: ["--batch_size", "100", "--num_workers", "1"],
    2: ["--warmup", "20", "--lr", "1e-3", "--anneal_coeff", "0.8", "--anneal_every_epoch", "1",
        "--enc_drop", "0.1", "--dec_drop", "0.1", "--enc_input_drop", "0.1", "--dec_input_drop", "0.1",
        "--drop_other", "0.1", "--batch_size", "16", "--grouped", "True", "--num_epochs", "3"],
    3: ["--warmup", "1", "--lr", "3e-4", "--anneal_coeff", "0.55", "--anneal_every_epoch", "1",
        "--enc_drop", "0.1", "--dec_drop", "0.1", "--enc_input_drop", "0.1", "--dec_input_drop", "0.1",
        "--drop_other", "0.1", "--batch_size", "16", "--grouped", "True", "--num_epochs", "1"],
    4: ["--batch_size", "100", "--num_workers", "1"],
    5: ["--warmup", "1", "--lr", "2e-4", "--anneal_coeff", "0.8", "--anneal_every_epoch", "1",
        "--enc_drop", "0.0", "--dec_drop", "0.0", "--enc_input_drop", "0.0", "--dec_input_drop", "0.0",
        "--drop_other", "0.0", "--batch_size", "16", "--num_epochs", "2"],
    6: ["--warmup", "1", "--lr", "2e-5", "--anneal_coeff", "1.0", "--enc_drop", "0.0", "--dec_drop", "0.0",
        "--enc_input_drop", "0.0", "--dec_input_drop", "0.0", "--drop_other", "0.0", "--batch_size", "16",
        "--num_epochs", "1"],
}


def _dropouts(p: float) -> list[str]:
    return [x for name in ("enc_drop", "dec_drop", "enc_input_drop", "dec_input_drop", "drop_other")
            for x in (f"--{name}", str(p))]


# the seed's six commands (seed-README.md), phase by phase
COCO_PHASES = {
    1: [],
    2: ["--warmup", "10000", "--lr", "2e-4", "--anneal_coeff", "0.8", "--anneal_every_epoch", "2", *_dropouts(0.3),
        "--batch_size", "48", "--num_accum", "1", "--print_every_iter", "11807", "--eval_every_iter", "999999",
        "--num_epochs", "8", "--eval_beam_sizes", "[3]"],
    3: ["--warmup", "1", "--lr", "3e-5", "--anneal_coeff", "0.55", "--anneal_every_epoch", "1", *_dropouts(0.3),
        "--batch_size", "8", "--num_accum", "3", "--print_every_iter", "15000", "--eval_every_iter", "999999",
        "--num_epochs", "2", "--eval_beam_sizes", "[3]"],
    4: [],
    5: ["--warmup", "1", "--lr", "1e-4", "--anneal_coeff", "0.8", "--anneal_every_epoch", "1", *_dropouts(0.1),
        "--batch_size", "8", "--num_accum", "2", "--print_every_iter", "4000", "--eval_every_iter", "99999",
        "--num_epochs", "9", "--eval_beam_sizes", "[5]"],
    6: ["--warmup", "1", "--lr", "2e-6", "--anneal_coeff", "1.0", *_dropouts(0.1), "--batch_size", "4",
        "--num_accum", "2", "--print_every_iter", "15000", "--eval_every_iter", "999999", "--num_epochs", "1",
        "--eval_beam_sizes", "[5]"],
}
# the reference's recipe for ExpansionNet v2 (3 + 3 layers, Swin-L): README of jchenghu/ExpansionNet_v2
COCO_V2_PHASES = {
    1: [],
    2: COCO_PHASES[2],
    3: ["--warmup", "1", "--lr", "3e-5", "--anneal_coeff", "0.55", "--anneal_every_epoch", "1", *_dropouts(0.3),
        "--batch_size", "16", "--num_accum", "3", "--print_every_iter", "15000", "--eval_every_iter", "999999",
        "--num_epochs", "2", "--eval_beam_sizes", "[3]"],
    4: [],
    5: ["--warmup", "1", "--lr", "1e-4", "--anneal_coeff", "0.8", "--anneal_every_epoch", "1", *_dropouts(0.1),
        "--batch_size", "24", "--num_accum", "2", "--print_every_iter", "4000", "--eval_every_iter", "99999",
        "--num_epochs", "9", "--eval_beam_sizes", "[5]"],
    6: ["--warmup", "1", "--lr", "2e-6", "--anneal_coeff", "1.0", *_dropouts(0.1), "--batch_size", "24",
        "--num_accum", "2", "--print_every_iter", "15000", "--eval_every_iter", "999999", "--num_epochs", "1",
        "--eval_beam_sizes", "[5]"],
}


def quickstart_inputs(run_dir: Path, num_train: int = 4000, num_val: int = 500, num_test: int = 500,
                      seed: int = 0) -> RecipeInputs:
    """Generate the synthetic dataset and a from-scratch tiny SwinV2 backbone (once), and the quickstart settings."""
    data_dir = run_dir / "data"
    captions = generate_synthetic_dataset(
        data_dir, SyntheticConfig(num_train=num_train, num_val=num_val, num_test=num_test, image_size=64, seed=seed))
    backbone_file = run_dir / "backbone-init.pth"
    if not backbone_file.exists():
        torch.manual_seed(seed)
        cfg = tiny_swinv2(img_size=64, embed_dim=32, depths=(1, 1), window_size=4)  # 8 x 8 tokens of 64 channels
        save_backbone_file(backbone_file, create_backbone(cfg), cfg)
    return RecipeInputs(images_path=data_dir, captions_path=captions, backbone=backbone_file,
                        model_args=QUICKSTART_MODEL, phase_args=QUICKSTART_PHASES, common_args=QUICKSTART_COMMON)


def coco_inputs(images_path: Path, captions_path: Path, backbone: Path, expansionnet_v2: bool) -> RecipeInputs:
    """The full recipes: the seed's Optimizer-ExpansionNet (2 + 2 layers, SwinV2-B) or the reference's v2."""
    if expansionnet_v2:
        model = ["--model", "expansionnet_v2", "--N_enc", "3", "--N_dec", "3", "--model_dim", "512"]
        phases = COCO_V2_PHASES
    else:
        model = ["--model", "optimizer_expansionnet", "--N_enc", "2", "--N_dec", "2", "--model_dim", "512"]
        phases = COCO_PHASES
    return RecipeInputs(images_path=images_path, captions_path=captions_path, backbone=backbone, model_args=model,
                        phase_args=phases, common_args=["--seed", "775533", "--optim_type", "radam", "--sched_type",
                                                        "custom_warmup_anneal", "--save_every_minutes", "60",
                                                        "--how_many_checkpoints", "1"])
