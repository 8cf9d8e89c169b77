"""Train a captioner: XE or SCST (--reinforce), on cached features or end-to-end (--is_end_to_end).

Every phase of the recipe is one command (see README); a run lives in its own folder under --save_path and a killed
run started again with the same command continues from its last checkpoint.
"""

from __future__ import annotations

import sys

import torch

from data.features import FeatureFileError
from data.loaders import CaptionDataset, EpochBatchSampler, ImageSource, make_loader
from data.records import DatasetError
from data.splits import split_records
from deploy.checkpoints import CheckpointError, load_backbone_into, load_weights
from engine.regimes import build_regime
from engine.setup import (
    TrainConfig,
    config_problems,
    eval_max_len,
    find_resume_checkpoint,
    resolve_setup,
    run_folder,
)
from engine.trainer import RunPlan, TrainData, Trainer
from models import build_model, count_parameters
from models.config import HYPERPARAMETERS, MODEL_VARIANTS, ModelConfig
from optims import ScheduleConfig, build_optimizer
from utils.cli import ArgumentParser, add_dataclass_flags, dataclass_values, plain_warnings
from utils.dist import DistInfo, launch, process_group
from utils.runtime import resolve_device, resolve_precision, seed_everything


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    add_dataclass_flags(p, TrainConfig)
    notes = {k: f"{v} for --model {name}" for name, changes in MODEL_VARIANTS.items() for k, v in changes.items()}
    add_dataclass_flags(p, ModelConfig, unset_default=True, notes=notes)
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    model = dataclass_values(args, ModelConfig)
    cfg = TrainConfig(**dataclass_values(args, TrainConfig),
                      model_overrides={k: model[k] for k in HYPERPARAMETERS if model[k] is not None})
    problems = config_problems(cfg)
    if problems:
        parser.error("; ".join(problems))
    return cfg


def worker(cfg: TrainConfig) -> None:
    """One training process (the only one, or one of num_gpus / torchrun's)."""
    with process_group(resolve_device(cfg.device).type, cfg.ddp_sync_port) as (dist, _):
        train(cfg, dist)


def train(cfg: TrainConfig, dist: DistInfo) -> None:
    seed_everything(cfg.seed + dist.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = run_folder(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = find_resume_checkpoint(cfg, run_dir)
    if resume and resume.get("train_state", {}).get("finished") and not cfg.resume:
        if dist.is_main:
            print(f"{run_dir} holds a finished run; nothing to do (delete the folder or use --run_name to rerun)")
        return
    setup = resolve_setup(cfg, resume, run_dir)
    model = build_model(setup.model_cfg)
    if setup.backbone_state is not None and not resume:
        load_backbone_into(model, *setup.backbone_state)
    if setup.model_state is not None:
        load_weights(model, setup.model_state, cfg.resume or cfg.weights_path() or "checkpoint",
                     strict=bool(resume) or not (cfg.partial_load or cfg.is_end_to_end))
    model.to(dist.device)
    splits = split_records(setup.records)
    if cfg.is_end_to_end:
        source = ImageSource(backbone=setup.model_cfg.backbone)
    else:
        source = ImageSource(features=setup.features)
        splits = {k: setup.features.keep_present(v) for k, v in splits.items()}
    regime = build_regime(cfg.reinforce, vocab=setup.vocab, vocab_size=setup.model_cfg.vocab_size,
                          train_records=splits["train"], grouped=cfg.grouped, scst_samples=cfg.scst_samples,
                          scst_max_len=cfg.scst_max_len)
    dataset = CaptionDataset(splits["train"], setup.vocab, source, mode=regime.unit)
    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed, dist.rank, dist.world,
                                accumulate=cfg.num_accum)
    optimizer = build_optimizer(model.parameters(), cfg.optim_type, cfg.lr)
    train_model: torch.nn.Module = torch.compile(model) if cfg.compile else model
    if dist.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    plan = RunPlan(run_dir, ScheduleConfig(cfg.sched_type, cfg.lr, cfg.warmup, cfg.anneal_coeff,
                                           cfg.anneal_every_epoch, iters_per_epoch=len(sampler), min_lr=cfg.min_lr),
                   precision=resolve_precision(cfg.precision, dist.device),
                   eval_max_len=eval_max_len(cfg, setup.model_cfg),
                   eval_at_start=bool(cfg.weights_path()) and not resume,
                   run_config={**cfg.as_dict(), "captions_path": setup.captions_path},
                   checkpoint_extra=setup.checkpoint_extra)
    data = TrainData(splits["train"], splits["val"], source, sampler,
                     lambda s: make_loader(dataset, s, cfg.num_workers, pin_memory=dist.device.type == "cuda"))
    trainer = Trainer(train_model, regime, optimizer, data, cfg, plan, dist, setup.model_cfg, setup.vocab)
    if resume:
        trainer.restore(resume)
    if dist.is_main:
        print(f"[{run_dir.name}] {setup.model_cfg.name}: {count_parameters(model) / 1e6:.2f}M parameters, "
              f"{'end-to-end' if cfg.is_end_to_end else 'cached features'}, {plan.precision}, device "
              f"{dist.device}, {dist.world} process(es)", flush=True)
    trainer.train()


def main(cfg: TrainConfig) -> None:
    launch(worker, cfg, cfg.num_gpus, cfg.ddp_sync_port)


if __name__ == "__main__":
    plain_warnings()
    try:
        main(parse_config())
    except (CheckpointError, DatasetError, FeatureFileError, FileExistsError) as e:
        sys.exit(f"error: {e}")
