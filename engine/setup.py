"""What a training run starts from: its config, its folder, and the policy that turns flags, feature-file attributes
and checkpoints into a model config, a vocabulary, data and initial weights.

train.py parses `TrainConfig` from the command line and hands it here; every decision of the setup is a function
with typed inputs, tested directly.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data.features import FeatureReader
from data.formats import CAPTIONS_PATH_HELP, load_records
from data.records import DatasetError, ImageRecord
from data.vocab import Vocabulary, build_vocabulary, max_caption_length
from deploy.checkpoints import CheckpointError, RestoredModel, latest_checkpoint, read_backbone_file, restore_model
from models.backbone import backbone_output_shape
from models.config import DROPOUTS, HYPERPARAMETERS, MODEL_NAMES, BackboneConfig, ModelConfig, model_config
from models.vocab_extension import extend_word_rows
from optims import OPTIMIZERS, SCHEDULES
from utils.checkpoint import load_checkpoint_file, state_dict_sha256
from utils.fields import option
from utils.runtime import RuntimeOptions

# settings that may change when a killed run is started again without changing what it computes
RESUME_NEUTRAL = frozenset({"num_workers", "save_every_minutes", "print_every_iter", "resume", "ddp_sync_port",
                            "eval_batch_size", "num_gpus", "deterministic", "device"})


@dataclass(frozen=True)
class TrainConfig(RuntimeOptions):
    """Every train.py setting; saved whole in each checkpoint. Model hyperparameters are ModelConfig's: the ones
    given on the command line are in model_overrides, the rest come from the named model or the body checkpoint."""

    # data
    is_end_to_end: bool = option(False, "train on images end-to-end (True) or on cached features (False)",
                                 group="data")
    features_path: str = option("", "HDF5 feature file from data_generator.py (feature phases)", group="data")
    images_path: str = option("", "image folder (end-to-end phases); a manifest's relative paths are looked up here "
                              "first, then beside the manifest", group="data")
    captions_path: str = option("", f"{CAPTIONS_PATH_HELP} (default: the one recorded in the feature file or "
                                "in the body checkpoint)", group="data")
    vocab_path: str = option("", "vocabulary JSON to use (default: built once from the training captions); with "
                             "--init_from an official checkpoint, its vocabulary (.pickle)", flag="vocab",
                             aliases=("--vocab_path",), group="data")
    min_word_count: int = option(5, "a word of the training captions enters the vocabulary when it occurs at least "
                                 "this many times (a fresh vocabulary, or the words --init_from's lacks)",
                                 group="data")
    grouped: bool = option(False, "XE: put all captions of an image in one batch, so the backbone runs once per image "
                           "(--batch_size then counts images)", group="data")
    # model and weights
    model: str = option("optimizer_expansionnet", "which captioner (fresh runs only)", choices=MODEL_NAMES,
                        group="model")
    img_size: int = option(0, "backbone input side in pixels (0: the backbone's own)", group="model")
    backbone_save_path: str = option("", "backbone weights: a Microsoft/timm Swin file, a backbone file of this "
                                     "project, or an end-to-end checkpoint", flag="backbone",
                                     aliases=("--backbone_save_path",), group="model")
    body_save_path: str = option("", "captioner weights from an earlier phase", group="model")
    init_from: str = option("", "start from this captioner's weights only (like --body_save_path); the training "
                            "captions' words it lacks (--min_word_count) get new rows, its own keep their ids",
                            group="model")
    partial_load: bool = option(False, "load the --body_save_path weights that exist in the model, allowing missing "
                                "ones", group="model")
    resume: str = option("", "continue from this checkpoint (model, optimizer, data position, RNG); by default a run "
                         "continues from its own folder's last checkpoint", group="model")
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # optimisation
    seed: int = option(775533, "random seed (each process adds its rank)", group="optimisation")
    optim_type: str = option("radam", "optimizer", choices=OPTIMIZERS, group="optimisation")
    sched_type: str = option("custom_warmup_anneal", "learning-rate schedule", choices=SCHEDULES,
                             group="optimisation")
    warmup: int = option(10000, "warm-up iterations (every micro-batch counts, as in the reference)",
                         aliases=("--warmup_iters",), group="optimisation")
    lr: float = option(2e-4, "peak learning rate", group="optimisation")
    min_lr: float = option(5e-7, "floor of the learning rate after warm-up", group="optimisation")
    anneal_coeff: float = option(0.8, "learning-rate factor at each annealing step", group="optimisation")
    anneal_every_epoch: float = option(2.0, "epochs between annealing steps", group="optimisation")
    batch_size: int = option(48, "per-process batch (captions for XE, images for SCST and --grouped)",
                             group="optimisation")
    num_accum: int = option(1, "micro-batches per optimizer step (their sum equals one big batch)",
                            group="optimisation")
    num_epochs: int = option(8, "epochs of this phase", group="optimisation")
    max_steps: int = option(0, "stop after this many optimizer steps, validating and saving there, even inside an "
                            "epoch (0: run every epoch), as Hugging Face's max_steps", group="optimisation")
    reinforce: bool = option(False, "self-critical CIDEr-D optimisation (True) or cross-entropy (False)",
                             group="optimisation")
    scst_samples: int = option(5, "captions sampled per image in SCST", group="optimisation")
    scst_max_len: int = option(20, "most tokens sampled per caption in SCST, EOS included", group="optimisation")
    compile: bool = option(False, "torch.compile the model", group="optimisation")
    # evaluation
    eval_beam_sizes: tuple[int, ...] = option((3,), "beam width(s) of the validation runs", aliases=("--beam_size",),
                                              group="evaluation")
    eval_batch_size: int = option(32, "images decoded together on validation (halves on out-of-memory)",
                                  group="evaluation")
    eval_max_len: int = option(0, "most tokens per validation caption, EOS included (0: as the reference, the "
                               "model's capacity for XE and --scst_max_len - 1 for SCST)", group="evaluation")
    eval_every_iter: int = option(999999, "also validate every this many iterations", group="evaluation")
    print_every_iter: int = option(1000, "log the running training figures every this many iterations",
                                   group="evaluation")
    # runtime
    save_path: str = option("./runs/", "parent folder; the run gets its own sub-folder", group="runtime")
    run_name: str = option("", "sub-folder name (default: xe-features, scst-e2e, ...)", group="runtime")
    save_every_minutes: float = option(60.0, "also checkpoint every this many minutes", group="runtime")
    how_many_checkpoints: int = option(1, "rolling checkpoints kept in this run's folder (best.pth is kept besides)",
                                       group="runtime")
    num_gpus: int = option(1, "processes on this machine (or start them with torchrun)", group="runtime")
    ddp_sync_port: int = option(12354, "port of the process group", group="runtime")
    deterministic: bool = option(False, "deterministic algorithms (bit-exact resume on the CPU)", group="runtime")

    def weights_path(self) -> str:
        """The checkpoint whose weights start this run (body or init-from), or ''."""
        return self.body_save_path or self.init_from

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) as stored in checkpoints and compared on resume."""
        return {k: _plain(v) for k, v in asdict(self).items()}


def _plain(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def config_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with a config before anything is read, each naming its flag."""
    problems = []
    if cfg.is_end_to_end and not cfg.images_path:
        problems.append("--is_end_to_end True needs --images_path")
    if not cfg.is_end_to_end and not cfg.features_path:
        problems.append("feature phases (--is_end_to_end False) need --features_path (from data_generator.py)")
    for name in ("batch_size", "num_accum", "num_epochs", "num_gpus", "scst_samples", "print_every_iter",
                 "min_word_count"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if cfg.max_steps < 0:
        problems.append("--max_steps must be 0 (every epoch) or positive")
    if cfg.reinforce and cfg.scst_samples < 2:
        problems.append("--scst_samples must be at least 2 (the baseline is the mean of the other samples)")
    unknown = set(cfg.model_overrides) - set(HYPERPARAMETERS)
    if unknown:
        problems.append(f"unknown model settings {sorted(unknown)}")
    for name in ("features_path", "images_path", "backbone_save_path", "body_save_path", "resume", "init_from",
                 "vocab_path"):
        value = getattr(cfg, name)
        if value and not Path(value).exists():
            problems.append(f"--{name} {value}: no such file or folder")
    return problems


def run_folder(cfg: TrainConfig) -> Path:
    """save_path/run_name, by default named after the phase kind (xe-features, scst-e2e, ...)."""
    tag = cfg.run_name or f"{'scst' if cfg.reinforce else 'xe'}-{'e2e' if cfg.is_end_to_end else 'features'}"
    return Path(cfg.save_path) / tag


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'--flag: old -> new' for every setting that changes what a run computes (a setting the old run predates
    counts as its default)."""
    defaults = TrainConfig(model_overrides={}).as_dict()
    return [f"--{k}: {old.get(k, defaults.get(k))!r} -> {v!r}" for k, v in new.items()
            if k not in RESUME_NEUTRAL and _plain(old.get(k, defaults.get(k))) != _plain(v)]


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
    diffs = config_differences(ckpt.get("train_config", {}), cfg.as_dict())
    if diffs:
        raise CheckpointError(f"run folder {run_dir} already holds a run with other settings ({'; '.join(diffs[:5])}). "
                              "Use another --save_path or --run_name, or --resume PATH to continue it regardless")
    print(f"continuing from {last}", flush=True)
    return ckpt


@dataclass
class Setup:
    """Everything a run starts from, decided once."""

    model_cfg: ModelConfig
    vocab: Vocabulary
    records: list[ImageRecord]
    model_state: dict[str, torch.Tensor] | None
    backbone_state: tuple[dict[str, torch.Tensor], str] | None
    features: FeatureReader | None
    captions_path: str
    checkpoint_extra: dict[str, Any]


def resolve_setup(cfg: TrainConfig, resume: dict[str, Any] | None, run_dir: Path) -> Setup:
    """Decide the model config, vocabulary, data and initial weights from flags, files and checkpoints."""
    features = FeatureReader(cfg.features_path) if not cfg.is_end_to_end else None
    body = restore_model(cfg.weights_path(), vocab_path=cfg.vocab_path or None) \
        if cfg.weights_path() and not resume else None
    prior = (resume or {}).get("train_config") or ((body.checkpoint.get("train_config") or {}) if body else {})
    captions_path = (cfg.captions_path or _feature_attr(features, "captions_path") or prior.get("captions_path", ""))
    if not captions_path:
        raise DatasetError("no captions file: pass --captions_path (Karpathy json, its folder, or a manifest)")
    records = load_records(captions_path, cfg.images_path or _feature_attr(features, "images_path") or None)
    backbone, backbone_state = training_backbone(cfg, resume, body)
    if resume:
        vocab = Vocabulary.from_dict(resume["vocab"])
        model_cfg = ModelConfig.from_dict(resume["model_config"])
        state = resume["model_state_dict"]
    elif body is not None:
        vocab = body.vocab
        model_cfg = body_model_config(body.config, cfg.model_overrides, backbone, str(body.path))
        state = {k: v for k, v in body.model.state_dict().items()
                 if cfg.is_end_to_end or not k.startswith("swin_transf.")}
        if cfg.init_from and not cfg.body_save_path:  # a captioner meets new captions: their new words join
            vocab, state = extend_vocabulary(body, state, records, cfg.min_word_count, run_dir, cfg.seed)
            model_cfg = replace(model_cfg, vocab_size=len(vocab))
        check_caption_lengths(records, vocab, model_cfg, str(body.path))
    else:
        vocab = fresh_vocabulary(cfg.vocab_path, records, run_dir, cfg.min_word_count)
        feature_dim = features.channels if features is not None else backbone_output_shape(backbone)[1]
        model_cfg = fresh_model_config(cfg.model, cfg.model_overrides, vocab, records, feature_dim, backbone)
        state = None
    extra = {}
    if features is not None:
        check_features(features, model_cfg, body)
        extra["features_attrs"] = {k: v for k, v in features.attrs.items() if isinstance(v, (str, int, float, bool))}
    return Setup(model_cfg, vocab, records, state, backbone_state, features, captions_path, extra)


def _feature_attr(features: FeatureReader | None, name: str) -> str:
    return str(features.attrs.get(name, "")) if features is not None else ""


def training_backbone(cfg: TrainConfig, resume: dict[str, Any] | None, body: RestoredModel | None
                      ) -> tuple[BackboneConfig | None, tuple[dict[str, torch.Tensor], str] | None]:
    """The end-to-end backbone's config and (from --backbone) its weights; (None, None) for feature phases.

    The config comes from the resumed checkpoint, else the backbone file, else the end-to-end body checkpoint;
    --img_size changes its input side.
    """
    if not cfg.is_end_to_end:
        return None, None
    bb_cfg, weights = None, None
    if cfg.backbone_save_path:
        bb_cfg, state = read_backbone_file(cfg.backbone_save_path, img_size=cfg.img_size or None)
        weights = (state, cfg.backbone_save_path)
    if resume:
        bb_cfg = ModelConfig.from_dict(resume["model_config"]).backbone or bb_cfg
    elif bb_cfg is None and body is not None:
        bb_cfg = body.config.backbone
    if bb_cfg is None:
        raise CheckpointError("end-to-end training needs a backbone: pass --backbone (a Swin file or a backbone file) "
                              "or an end-to-end --body_save_path checkpoint")
    if cfg.img_size and cfg.img_size != bb_cfg.img_size:
        bb_cfg = replace(bb_cfg, img_size=cfg.img_size)
    return bb_cfg, weights


def body_model_config(body: ModelConfig, overrides: dict[str, Any], backbone: BackboneConfig | None,
                      source: str) -> ModelConfig:
    """A body checkpoint's model with this phase's dropouts and backbone; architecture flags must agree with it."""
    conflicts = [f"--{k} {v!r} (the checkpoint has {getattr(body, k)!r})" for k, v in overrides.items()
                 if k not in DROPOUTS and _plain(getattr(body, k)) != _plain(v)]
    if conflicts:
        raise CheckpointError(f"{source} holds another model than the flags describe: {'; '.join(conflicts)}. Drop "
                              "those flags (the checkpoint describes its own model) or start from another checkpoint")
    return replace(body, backbone=backbone, **{k: v for k, v in overrides.items() if k in DROPOUTS})


def fresh_model_config(name: str, overrides: dict[str, Any], vocab: Vocabulary, records: list[ImageRecord],
                       feature_dim: int, backbone: BackboneConfig | None) -> ModelConfig:
    """A new captioner: the named model with the flags given; max_seq_len = longest training caption + 20 (the
    reference's rule)."""
    train_caps = training_captions(records)
    max_len = max_caption_length(train_caps, vocab) + 20
    return model_config(name, **overrides, vocab_size=len(vocab), max_seq_len=max_len, img_feature_dim=feature_dim,
                        backbone=backbone)


def fresh_vocabulary(vocab_path: str, records: list[ImageRecord], run_dir: Path, min_count: int = 5) -> Vocabulary:
    """vocab_path, or built once from the training captions and saved beside the run (the explicit step)."""
    if vocab_path:
        return Vocabulary.load(vocab_path)
    train_caps = training_captions(records)
    vocab = build_vocabulary(train_caps, min_count=min_count)
    path = vocab.save(run_dir / "vocab.json")
    print(f"built a vocabulary of {len(vocab)} tokens from {len(train_caps)} training captions (min count "
          f"{min_count}): {path}")
    return vocab


def new_words(vocab: Vocabulary, records: list[ImageRecord], min_count: int) -> list[str]:
    """The training captions' words that occur at least min_count times and vocab lacks, in vocabulary order."""
    return [w for w in build_vocabulary(training_captions(records), min_count=min_count).tokens if w not in vocab]


def extend_vocabulary(body: RestoredModel, state: dict[str, torch.Tensor], records: list[ImageRecord],
                      min_count: int, run_dir: Path, seed: int) -> tuple[Vocabulary, dict[str, torch.Tensor]]:
    """The starting captioner's vocabulary with the new words appended (old ids unchanged) and its state dict with
    their rows (models.vocab_extension: its captions stay as they were until training moves them); the vocabulary
    is saved beside the run and the log names the words."""
    words = new_words(body.vocab, records, min_count)
    if not words:
        print(f"the training captions' words (min count {min_count}) are all in the vocabulary of {body.path} "
              f"({len(body.vocab)} tokens)", flush=True)
        return body.vocab, state
    vocab = Vocabulary((*body.vocab.tokens, *words))
    path = vocab.save(run_dir / "vocab.json", overwrite=True)
    shown = ", ".join(words[:20]) + (f" and {len(words) - 20} more" if len(words) > 20 else "")
    print(f"extended the vocabulary of {body.path} ({len(body.vocab)} tokens) with {len(words)} words of the "
          f"training captions (min count {min_count}), ids {len(body.vocab)}-{len(vocab) - 1}: {shown}; {path}",
          flush=True)
    return vocab, extend_word_rows(state, len(words), seed=seed)


def check_caption_lengths(records: list[ImageRecord], vocab: Vocabulary, model_cfg: ModelConfig, source: str) -> None:
    """Refuse training captions longer than the starting model's positions (its max_seq_len)."""
    train_caps = training_captions(records)
    longest = max_caption_length(train_caps, vocab) if train_caps else 0
    if longest - 1 > model_cfg.max_seq_len:  # teacher forcing reads SOS and the words, one position each
        raise DatasetError(f"the longest training caption has {longest - 2} words, more than the model of {source} "
                           f"has positions for ({model_cfg.max_seq_len - 1}); shorten those captions")


def training_captions(records: list[ImageRecord]) -> list[str]:
    """Every caption of the training split."""
    return [c for r in records if r.split == "train" for c in r.captions]


def check_features(features: FeatureReader, model_cfg: ModelConfig, body: RestoredModel | None) -> None:
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


def eval_max_len(cfg: TrainConfig, model_cfg: ModelConfig) -> int:
    """Validation length cap in generated tokens: --eval_max_len, else the reference's (capacity for XE, the SCST
    sampling cap minus one for SCST, since the reference's beam search counts SOS)."""
    capacity = model_cfg.max_seq_len - 1
    if cfg.eval_max_len:
        return min(cfg.eval_max_len, capacity)
    return min(cfg.scst_max_len - 1, capacity) if cfg.reinforce else capacity
