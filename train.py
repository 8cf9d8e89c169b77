"""Train a captioner: XE or SCST (--reinforce), on cached features or end-to-end (--is_end_to_end).

Every phase of the recipe is one command (see README); a run lives in its own folder under --save_path and a killed
run started again with the same command continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from data.captions import DatasetError, ImageRecord, load_records, split_records
from data.features import FeatureFileError, FeatureReader
from data.loaders import CaptionDataset, EpochBatchSampler, ImageSource, make_loader
from data.vocab import Vocabulary, build_vocabulary, max_caption_length
from engine.checkpoints import (
    CheckpointError,
    load_backbone_into,
    load_weights,
    read_backbone_file,
    restore_model,
)
from engine.trainer import LoopSettings, Trainer, latest_checkpoint
from models import ModelConfig, build_model, count_parameters
from models.backbone import backbone_output_shape
from models.config import MODEL_NAMES, optimizer_expansionnet_config
from optims import ScheduleConfig, build_optimizer
from utils.checkpoint import load_checkpoint_file, state_dict_sha256
from utils.cli import int_list, str2bool
from utils.dist import cleanup, init_distributed, launch
from utils.runtime import resolve_precision, seed_everything

# settings that may change when a killed run is started again without changing what it computes
RESUME_NEUTRAL = {"num_workers", "save_every_minutes", "print_every_iter", "resume", "ddp_sync_port",
                  "eval_batch_size", "num_gpus", "deterministic"}


@dataclass(frozen=True)
class TrainConfig:
    """Every train.py argument; saved whole in each checkpoint."""

    model: str = "optimizer_expansionnet"
    N_enc: int = 2
    N_dec: int = 2
    model_dim: int = 512
    num_heads: int = 8
    ff: int = 2048
    num_exp_enc_list: tuple[int, ...] = (32, 64, 128, 256, 512)
    num_exp_dec: int = 16
    memory_slots: int = -1
    mult_residual: str = "auto"
    seed: int = 775533
    optim_type: str = "radam"
    sched_type: str = "custom_warmup_anneal"
    warmup: int = 10000
    lr: float = 2e-4
    min_lr: float = 5e-7
    anneal_coeff: float = 0.8
    anneal_every_epoch: float = 2.0
    enc_drop: float = 0.1
    dec_drop: float = 0.1
    enc_input_drop: float = 0.1
    dec_input_drop: float = 0.1
    drop_other: float = 0.1
    batch_size: int = 48
    num_accum: int = 1
    num_gpus: int = 1
    ddp_sync_port: int = 12354
    eval_beam_sizes: tuple[int, ...] = (3,)
    eval_batch_size: int = 32
    eval_max_len: int = 20
    save_path: str = "./runs/"
    run_name: str = ""
    save_every_minutes: float = 60.0
    how_many_checkpoints: int = 1
    is_end_to_end: bool = False
    features_path: str = ""
    images_path: str = ""
    captions_path: str = ""
    vocab_path: str = ""
    partial_load: bool = False
    backbone_save_path: str = ""
    body_save_path: str = ""
    resume: str = ""
    init_from: str = ""
    print_every_iter: int = 1000
    eval_every_iter: int = 999999
    reinforce: bool = False
    num_epochs: int = 8
    scst_samples: int = 5
    scst_max_len: int = 20
    amp: str = "auto"
    compile: bool = False
    num_workers: int = 2
    device: str = "auto"
    img_size: int = 0
    deterministic: bool = False
    grouped: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_NAMES, default=d.model, help="which captioner (fresh runs only)")
    g.add_argument("--N_enc", type=int, default=d.N_enc, help="encoder layers (2 for the seed's model, 3 for v2)")
    g.add_argument("--N_dec", type=int, default=d.N_dec, help="decoder layers")
    g.add_argument("--model_dim", type=int, default=d.model_dim, help="d_model")
    g.add_argument("--num_heads", type=int, default=d.num_heads, help="attention heads")
    g.add_argument("--ff", type=int, default=d.ff, help="feed-forward width")
    g.add_argument("--num_exp_enc_list", type=int_list, default=d.num_exp_enc_list, help="static expansion lengths")
    g.add_argument("--num_exp_dec", type=int, default=d.num_exp_dec, help="dynamic expansion length")
    g.add_argument("--memory_slots", type=int, default=d.memory_slots,
                   help="memory slots of memory-augmented attention (0 off; -1: the model's default, 40 or 0)")
    g.add_argument("--mult_residual", choices=("auto", "on", "off"), default=d.mult_residual,
                   help="multiplicative residual embedding (auto: on for optimizer_expansionnet)")
    g.add_argument("--img_size", type=int, default=d.img_size, help="backbone input size (0: the backbone's own)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--optim_type", choices=("radam", "adam"), default=d.optim_type)
    g.add_argument("--sched_type", choices=("custom_warmup_anneal", "annealing", "fixed"), default=d.sched_type)
    g.add_argument("--warmup", "--warmup_iters", dest="warmup", type=int, default=d.warmup,
                   help="warm-up iterations (the schedule counts every micro-batch, as the reference)")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min_lr", type=float, default=d.min_lr)
    g.add_argument("--anneal_coeff", type=float, default=d.anneal_coeff)
    g.add_argument("--anneal_every_epoch", type=float, default=d.anneal_every_epoch)
    for name in ("enc_drop", "dec_drop", "enc_input_drop", "dec_input_drop", "drop_other"):
        g.add_argument(f"--{name}", type=float, default=getattr(d, name))
    g.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="per-process batch (captions for XE, images for SCST)")
    g.add_argument("--num_accum", type=int, default=d.num_accum, help="micro-batches per optimizer step")
    g.add_argument("--num_epochs", type=int, default=d.num_epochs)
    g.add_argument("--reinforce", type=str2bool, default=d.reinforce, help="SCST (True) or cross-entropy (False)")
    g.add_argument("--scst_samples", type=int, default=d.scst_samples, help="sampled captions per image in SCST")
    g.add_argument("--scst_max_len", type=int, default=d.scst_max_len, help="max sampled tokens in SCST")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default=d.amp,
                   help="mixed precision (auto: bf16 on a GPU, none on the CPU)")
    g.add_argument("--compile", type=str2bool, default=d.compile, help="torch.compile the model")
    g.add_argument("--grouped", type=str2bool, default=d.grouped,
                   help="XE: put all captions of an image in one batch (backbone runs once per image)")
    g = p.add_argument_group("data and checkpoints")
    g.add_argument("--is_end_to_end", type=str2bool, default=d.is_end_to_end)
    g.add_argument("--features_path", default=d.features_path, help="HDF5 from data_generator.py (feature phases)")
    g.add_argument("--images_path", default=d.images_path, help="image folder (end-to-end phases)")
    g.add_argument("--captions_path", default=d.captions_path,
                   help="Karpathy json (or its folder) or a JSON-lines manifest; default: the one recorded in the "
                        "feature file or in the --body_save_path checkpoint")
    g.add_argument("--vocab_path", default=d.vocab_path, help="vocabulary JSON (default: built once from train)")
    g.add_argument("--partial_load", type=str2bool, default=d.partial_load,
                   help="load --body_save_path weights that exist in the model, allowing missing ones")
    g.add_argument("--backbone_save_path", default=d.backbone_save_path,
                   help="backbone weights: Microsoft/timm Swin file or an end-to-end checkpoint")
    g.add_argument("--body_save_path", default=d.body_save_path, help="captioner weights from an earlier phase")
    g.add_argument("--init_from", default=d.init_from, help="start from these weights only (like --body_save_path)")
    g.add_argument("--resume", default=d.resume,
                   help="continue from this checkpoint (model, optimizer, data position, RNG); by default a run "
                        "continues from its own folder's last checkpoint")
    g.add_argument("--save_path", default=d.save_path, help="parent folder; the run gets its own sub-folder")
    g.add_argument("--run_name", default=d.run_name, help="sub-folder name (default: xe-features, scst-e2e, ...)")
    g.add_argument("--save_every_minutes", type=float, default=d.save_every_minutes)
    g.add_argument("--how_many_checkpoints", type=int, default=d.how_many_checkpoints,
                   help="rolling checkpoints kept in this run's folder (best.pth is kept besides)")
    g = p.add_argument_group("evaluation, logging, runtime")
    g.add_argument("--eval_beam_sizes", type=int_list, default=d.eval_beam_sizes)
    g.add_argument("--eval_batch_size", type=int, default=d.eval_batch_size, help="halves on out-of-memory")
    g.add_argument("--eval_max_len", type=int, default=d.eval_max_len, help="max tokens when evaluating XE")
    g.add_argument("--print_every_iter", type=int, default=d.print_every_iter)
    g.add_argument("--eval_every_iter", type=int, default=d.eval_every_iter)
    g.add_argument("--num_gpus", type=int, default=d.num_gpus, help="processes on this machine (or use torchrun)")
    g.add_argument("--ddp_sync_port", type=int, default=d.ddp_sync_port)
    g.add_argument("--num_workers", type=int, default=d.num_workers, help="DataLoader worker processes")
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    g.add_argument("--deterministic", type=str2bool, default=d.deterministic,
                   help="deterministic algorithms (bit-exact resume on the CPU)")
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    a = vars(parser.parse_args(argv))
    cfg = TrainConfig(**a)
    problems = []
    if cfg.is_end_to_end and not cfg.images_path:
        problems.append("--is_end_to_end True needs --images_path")
    if not cfg.is_end_to_end and not cfg.features_path:
        problems.append("feature phases (--is_end_to_end False) need --features_path (from data_generator.py)")
    for name in ("batch_size", "num_accum", "num_epochs", "num_gpus", "scst_samples", "print_every_iter"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if cfg.reinforce and cfg.scst_samples < 2:
        problems.append("--scst_samples must be at least 2 (the baseline is the mean of the other samples)")
    for name in ("features_path", "images_path", "backbone_save_path", "body_save_path", "resume", "init_from",
                 "vocab_path"):
        value = getattr(cfg, name)
        if value and not Path(value).exists():
            problems.append(f"--{name} {value}: no such file or folder")
    if problems:
        parser.error("; ".join(problems))
    return cfg


def run_folder(cfg: TrainConfig) -> Path:
    tag = cfg.run_name or f"{'scst' if cfg.reinforce else 'xe'}-{'e2e' if cfg.is_end_to_end else 'features'}"
    return Path(cfg.save_path) / tag


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"--{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
            if k not in RESUME_NEUTRAL and _plain(old.get(k)) != _plain(v)]


def _plain(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def find_resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    """--resume PATH, else this run folder's last checkpoint when the settings are the same."""
    if cfg.resume:
        ckpt = load_checkpoint_file(cfg.resume)
        if "train_state" not in ckpt:
            raise CheckpointError(f"--resume {cfg.resume} holds no training state; use --init_from for weights only")
        return ckpt
    last = latest_checkpoint(run_dir)
    if last is None:
        return None
    ckpt = load_checkpoint_file(last)
    diffs = config_differences(ckpt.get("train_config", {}), _config_dict(cfg))
    if diffs:
        raise CheckpointError(f"run folder {run_dir} already holds a run with other settings ({'; '.join(diffs[:5])}). "
                              "Use another --save_path or --run_name, or --resume PATH to continue it regardless")
    print(f"continuing from {last}", flush=True)
    return ckpt


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {k: _plain(v) for k, v in asdict(cfg).items()}


@dataclass
class Setup:
    model_cfg: ModelConfig
    vocab: Vocabulary
    records: list[ImageRecord]
    model_state: dict[str, torch.Tensor] | None
    backbone_state: tuple[dict[str, torch.Tensor], str] | None
    features: FeatureReader | None
    captions_path: str
    extra: dict[str, Any]


def resolve_setup(cfg: TrainConfig, resume: dict[str, Any] | None, run_dir: Path) -> Setup:
    """Decide the model config, vocabulary, data and initial weights from flags, files and checkpoints."""
    features = FeatureReader(cfg.features_path) if not cfg.is_end_to_end else None
    body_path = cfg.body_save_path or cfg.init_from
    body = restore_model(body_path, vocab_path=cfg.vocab_path or None) if body_path and not resume else None
    prior_config = (resume or {}).get("train_config") or ((body.checkpoint.get("train_config") or {}) if body else {})
    captions_path = (cfg.captions_path or (str(features.attrs.get("captions_path", "")) if features else "")
                     or prior_config.get("captions_path", ""))
    if not captions_path:
        raise DatasetError("no captions file: pass --captions_path (Karpathy json, its folder, or a manifest)")
    images_path = cfg.images_path or (str(features.attrs.get("images_path", "")) if features else "") or None
    records = load_records(captions_path, images_path)

    backbone_state = None
    bb_cfg = None
    if cfg.is_end_to_end:
        if cfg.backbone_save_path:
            bb_cfg, state = read_backbone_file(cfg.backbone_save_path, img_size=cfg.img_size or None)
            backbone_state = (state, cfg.backbone_save_path)
        if resume:
            bb_cfg = ModelConfig.from_dict(resume["model_config"]).backbone or bb_cfg
        elif bb_cfg is None and body is not None:
            bb_cfg = body.config.backbone
        if bb_cfg is None:
            raise CheckpointError("end-to-end training needs a backbone: pass --backbone_save_path (a Swin file) or "
                                  "an end-to-end --body_save_path checkpoint")
        if cfg.img_size and cfg.img_size != bb_cfg.img_size:
            bb_cfg = replace(bb_cfg, img_size=cfg.img_size)

    if resume:
        vocab = Vocabulary.from_dict(resume["vocab"])
        model_cfg = ModelConfig.from_dict(resume["model_config"])
        state = resume["model_state_dict"]
    elif body is not None:
        vocab = body.vocab
        model_cfg = body.config.with_dropouts(cfg.enc_drop, cfg.dec_drop, cfg.enc_input_drop, cfg.dec_input_drop,
                                              cfg.drop_other)
        model_cfg = replace(model_cfg, backbone=bb_cfg) if cfg.is_end_to_end else model_cfg.without_backbone()
        state = {k: v for k, v in body.model.state_dict().items()
                 if cfg.is_end_to_end or not k.startswith("swin_transf.")}
    else:
        vocab = fresh_vocabulary(cfg, records, run_dir)
        model_cfg = fresh_model_config(cfg, vocab, records, features, bb_cfg)
        state = None
    if features is not None:
        check_features(features, model_cfg, body)
    extra = {"features_attrs": {k: v for k, v in features.attrs.items() if isinstance(v, (str, int, float, bool))}
             } if features else {}
    return Setup(model_cfg, vocab, records, state, backbone_state, features, captions_path, extra)


def check_features(features: FeatureReader, model_cfg: ModelConfig, body) -> None:
    """Refuse features of another width or backbone than the model's; warn when they come from other backbone
    weights than the body checkpoint's (phase 5 should read the features regenerated from the phase-3 backbone)."""
    body_backbone = body.model.backbone if body is not None else None
    expected = body.config.backbone if body is not None and body.config.backbone is not None else model_cfg.backbone
    features.check_matches(expected.to_dict() if expected else None, model_cfg.img_feature_dim)
    if body_backbone is not None and features.attrs.get("weights_sha256") not in (
            None, state_dict_sha256(body_backbone.state_dict())):
        print(f"warning: {features.path} was extracted with other backbone weights than those in the body "
              "checkpoint; for the recipe's phase 5, regenerate the features from that checkpoint (phase 4)",
              file=sys.stderr)


def fresh_vocabulary(cfg: TrainConfig, records: list[ImageRecord], run_dir: Path) -> Vocabulary:
    """--vocab_path, or built once from the training captions and saved beside the run (the explicit step)."""
    if cfg.vocab_path:
        return Vocabulary.load(cfg.vocab_path)
    train_caps = [c for r in records if r.split == "train" for c in r.captions]
    vocab = build_vocabulary(train_caps, min_count=5)
    path = vocab.save(run_dir / "vocab.json")
    print(f"built a vocabulary of {len(vocab)} tokens from {len(train_caps)} training captions (min count 5): {path}")
    return vocab


def fresh_model_config(cfg: TrainConfig, vocab: Vocabulary, records: list[ImageRecord],
                       features: FeatureReader | None, backbone) -> ModelConfig:
    """A new captioner from the flags; max_seq_len = longest training caption + 20 (the reference's rule)."""
    train_caps = [c for r in records if r.split == "train" for c in r.captions]
    max_len = max_caption_length(train_caps, vocab) + 20
    feature_dim = features.channels if features is not None else backbone_output_shape(backbone)[1]
    base = optimizer_expansionnet_config if cfg.model == "optimizer_expansionnet" else None
    memory = cfg.memory_slots if cfg.memory_slots >= 0 else (40 if base else 0)
    gated = cfg.mult_residual == "on" or (cfg.mult_residual == "auto" and base is not None)
    return ModelConfig(name=cfg.model, vocab_size=len(vocab), max_seq_len=max_len, d_model=cfg.model_dim,
                       N_enc=cfg.N_enc, N_dec=cfg.N_dec, num_heads=cfg.num_heads, ff=cfg.ff,
                       num_exp_enc_list=cfg.num_exp_enc_list, num_exp_dec=cfg.num_exp_dec,
                       img_feature_dim=feature_dim, memory_slots=memory, mult_residual=gated,
                       enc_drop=cfg.enc_drop, dec_drop=cfg.dec_drop, enc_input_drop=cfg.enc_input_drop,
                       dec_input_drop=cfg.dec_input_drop, drop_other=cfg.drop_other,
                       backbone=backbone if cfg.is_end_to_end else None)


def worker(cfg: TrainConfig) -> None:
    """One training process (the only one, or one of num_gpus / torchrun's)."""
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else \
        torch.device(cfg.device).type
    dist = init_distributed(device_type, cfg.ddp_sync_port)
    try:
        _train(cfg, dist)
    finally:
        cleanup()


def _train(cfg: TrainConfig, dist) -> None:
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
        load_weights(model, setup.model_state, cfg.resume or cfg.body_save_path or cfg.init_from or "checkpoint",
                     strict=bool(resume) or not (cfg.partial_load or cfg.is_end_to_end))
    model.to(dist.device)
    precision = resolve_precision(cfg.amp, dist.device)
    splits = split_records(setup.records)
    if cfg.is_end_to_end:
        bb = setup.model_cfg.backbone
        source = ImageSource(img_size=bb.img_size, mean=bb.mean, std=bb.std)
    else:
        source = ImageSource(features=setup.features)
        missing = [r for r in setup.records if not setup.features.has(r.image_id)]
        if missing:
            print(f"warning: {len(missing)} images have no features in {cfg.features_path} (unreadable when the "
                  f"file was made, e.g. {missing[0].path}); they are skipped", file=sys.stderr)
            splits = {k: [r for r in v if setup.features.has(r.image_id)] for k, v in splits.items()}
    mode = "image" if (cfg.reinforce or cfg.grouped) else "caption"
    dataset = CaptionDataset(splits["train"], setup.vocab, source, mode=mode)
    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed, dist.rank, dist.world,
                                accumulate=cfg.num_accum)
    pin = dist.device.type == "cuda"

    def loader_factory(s: EpochBatchSampler):
        return make_loader(dataset, s, num_workers=cfg.num_workers, pin_memory=pin)

    optimizer = build_optimizer(model.parameters(), cfg.optim_type, cfg.lr)
    train_model: torch.nn.Module = torch.compile(model) if cfg.compile else model
    if dist.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    schedule = ScheduleConfig(cfg.sched_type, cfg.lr, cfg.warmup, cfg.anneal_coeff, cfg.anneal_every_epoch,
                              iters_per_epoch=len(sampler), min_lr=cfg.min_lr)
    phase = run_dir.name
    settings = LoopSettings(reinforce=cfg.reinforce, num_epochs=cfg.num_epochs, num_accum=cfg.num_accum,
                            schedule=schedule, precision=precision, eval_beam_sizes=cfg.eval_beam_sizes,
                            eval_every_iter=cfg.eval_every_iter, eval_batch_size=cfg.eval_batch_size,
                            eval_max_len=min(cfg.eval_max_len, setup.model_cfg.max_seq_len),
                            print_every_iter=cfg.print_every_iter, save_every_minutes=cfg.save_every_minutes,
                            how_many_checkpoints=cfg.how_many_checkpoints, run_dir=run_dir, phase=phase,
                            scst_samples=cfg.scst_samples, scst_max_len=cfg.scst_max_len,
                            num_workers=cfg.num_workers,
                            eval_at_start=bool(cfg.body_save_path or cfg.init_from) and not resume,
                            grouped=cfg.grouped)
    run_config = _config_dict(replace(cfg, captions_path=setup.captions_path))
    trainer = Trainer(train_model, setup.model_cfg, setup.vocab, optimizer, splits["train"], splits["val"], source,
                      loader_factory, sampler, settings, dist, run_config, setup.extra)
    if resume:
        trainer.restore(resume)
    if dist.is_main:
        print(f"[{phase}] {setup.model_cfg.name}: {count_parameters(model) / 1e6:.2f}M parameters, "
              f"{'end-to-end' if cfg.is_end_to_end else 'cached features'}, {precision}, device {dist.device}, "
              f"{dist.world} process(es)", flush=True)
    trainer.train()


def main(cfg: TrainConfig) -> None:
    launch(worker, cfg, cfg.num_gpus, cfg.ddp_sync_port)


if __name__ == "__main__":
    try:
        main(parse_config())
    except (CheckpointError, DatasetError, FeatureFileError, FileExistsError) as e:
        sys.exit(f"error: {e}")

