"""Phase 0: pretrain a from-scratch backbone on the dataset's own labels, the quickstart's stand-in for the
ImageNet-pretrained Swin the COCO recipe starts from (nothing is downloaded).

Two kinds of labels (`--labels auto` picks ground_truth when the synthetic dataset's ground_truth.json is beside the
captions file, words otherwise):
- ground_truth (the synthetic dataset): every token learns what lies under its cell (colour, shape and size of the
  object covering it, whether an object's centre is there, the count of that object's group, the cell's position),
  the mean token the background kind and brightness;
- words (any captioned dataset, your own photos included): every token scores the caption words, the image's score of
  a word is its best token's (multiple-instance), trained to say which words the image's captions use.
Only the backbone is kept (the heads are discarded), written as an ordinary backbone file that phases 1 and 3 read.
Each epoch is checkpointed beside the output, so a killed run continues; metrics.jsonl and curves.png log it.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data.formats import load_records
from data.images import open_image
from data.records import DatasetError, ImageRecord
from data.splits import split_records
from data.synthetic import BACKGROUNDS, COLOURS, GROUND_TRUTH_NAME, SHAPES, load_ground_truth
from data.vocab import tokenize
from deploy.checkpoints import read_backbone_file, save_backbone_file
from engine.runlog import RunLog
from models.backbone import (
    BackboneWeightsError,
    backbone_output_shape,
    backbone_tokens,
    create_backbone,
    load_backbone_state_dict,
    published_source,
)
from models.config import BACKBONE_SIZES, BackboneConfig, backbone_preset
from optims import warmup_flat_cosine
from utils.checkpoint import atomic_save, load_state_file
from utils.fields import option
from utils.files import atomic_write_json
from utils.plots import save_curves
from utils.runtime import RuntimeOptions, resolve_device

COLOUR_NAMES, SHAPE_NAMES = list(COLOURS), list(SHAPES)
# per-token outputs of the ground-truth heads: colour (background + 8), shape (background + 6), size (background,
# small, large), object centre in the cell (no, yes), the group's count (background, 1, 2, 3), the cell's (x, y)
DENSE_SLICES = {"colour": (0, 9), "shape": (9, 16), "size": (16, 19), "centre": (19, 21), "count": (21, 25),
                "xy": (25, 27)}
DENSE_CLASSES = ("colour", "shape", "size", "centre", "count")
MIN_WORD_IMAGES = 5  # words-labels: a word names at least this many training images to be a target


@dataclass(frozen=True)
class PretrainConfig(RuntimeOptions):
    """Every `backbone.py pretrain` setting (phase 0)."""

    images_path: str = option("", "image folder (as for data_generator.py)", required=True, group="data")
    captions_path: str = option("", "Karpathy json or manifest; its train split is learnt, its val split probed",
                                required=True, group="data")
    output_path: str = option("", "backbone file to write", required=True, group="data")
    labels: str = option("auto", "what the backbone learns: ground_truth (the synthetic dataset's scenes), words (the "
                         "captions' words, any dataset) or auto (ground_truth when ground_truth.json is beside the "
                         "captions file)", choices=("auto", "ground_truth", "words"), group="data")
    init: str = option("quickstart", f"the backbone to start from: a named size ({', '.join(sorted(BACKBONE_SIZES))}"
                       ") from scratch, or a backbone file", group="model")
    img_size: int = option(0, "input side in pixels (0: the backbone's own)", group="model")
    epochs: int = option(3, "passes over the training images", group="optimisation")
    batch_size: int = option(16, "images per step", group="optimisation")
    lr: float = option(5e-3, "peak learning rate (AdamW)", group="optimisation")
    weight_decay: float = option(0.05, "AdamW weight decay of the matrices", group="optimisation")
    warmup_frac: float = option(0.05, "share of the steps warming up linearly", group="optimisation")
    decay_frac: float = option(0.4, "share of the steps at the end decaying to zero (cosine)", group="optimisation")
    seed: int = option(0, "random seed", group="optimisation")


@dataclass
class LabelledImages:
    """A split in memory: uint8 images (N, 3, S, S) and per-image targets of the chosen kind."""

    images: torch.Tensor
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.images[index], {k: v[index] for k, v in self.targets.items()}


# ------------------------------------------------------------------------------------------------ labels
def load_images(records: list[ImageRecord], size: int) -> torch.Tensor:
    """Every record's image as uint8 (N, 3, size, size), resized like data.images.preprocess."""
    out = np.zeros((len(records), size, size, 3), np.uint8)
    for i, r in enumerate(tqdm(records, desc="phase 0 images", unit="img", leave=False)):
        image = open_image(r.path)
        out[i] = np.asarray(image.resize((size, size), resample=_BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as data.images.preprocess resizes


def ground_truth_targets(records: list[ImageRecord], truth: dict[int, dict[str, Any]], side: int, grid: int
                         ) -> dict[str, torch.Tensor]:
    """Per token cell (grid x grid over the generated image's side in pixels): the colour, shape, size, centre flag
    and group count of the object covering it; per image: the background kind and brightness."""
    n = len(records)
    labels = {k: np.zeros((n, grid, grid), np.int64) for k in DENSE_CLASSES}
    bg, dark = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i, r in enumerate(records):
        entry = truth[r.image_id]
        bg[i] = BACKGROUNDS.index(entry["background"]["kind"])
        dark[i] = entry["background"]["brightness"] == "dark"
        cell = side / grid
        centres = (np.arange(grid) + 0.5) * cell
        for o in entry["objects"]:
            # cells whose centre lies inside 0.8 x the object's bounding radius, and the cell holding its centre
            covered = np.hypot(centres[None, :] - o["x"], centres[:, None] - o["y"]) <= max(0.8 * o["radius"],
                                                                                             0.5 * cell)
            cy, cx = min(grid - 1, int(o["y"] / cell)), min(grid - 1, int(o["x"] / cell))
            covered[cy, cx] = True
            labels["colour"][i][covered] = 1 + COLOUR_NAMES.index(o["colour"])
            labels["shape"][i][covered] = 1 + SHAPE_NAMES.index(o["shape"])
            labels["size"][i][covered] = 1 + (o["size"] == "large")
            labels["count"][i][covered] = entry["groups"][o["group"]]["count"]
            labels["centre"][i, cy, cx] = 1
    out = {k: torch.from_numpy(v).flatten(1) for k, v in labels.items()}  # (N, grid * grid)
    return {**out, "bg": torch.from_numpy(bg), "dark": torch.from_numpy(dark)}


def word_list(records: list[ImageRecord]) -> list[str]:
    """The words of the training captions that name at least MIN_WORD_IMAGES images (and not every image)."""
    counts = Counter(w for r in records for w in {w for c in r.captions for w in tokenize(c)})
    return sorted(w for w, n in counts.items() if MIN_WORD_IMAGES <= n < len(records))


def word_targets(records: list[ImageRecord], words: list[str]) -> dict[str, torch.Tensor]:
    """Multi-hot (N, len(words)): which words any caption of the image uses."""
    index = {w: j for j, w in enumerate(words)}
    out = torch.zeros(len(records), len(words))
    for i, r in enumerate(records):
        for w in {w for c in r.captions for w in tokenize(c)}:
            if w in index:
                out[i, index[w]] = 1.0
    return {"words": out}


# ------------------------------------------------------------------------------------------------ heads and losses
class GroundTruthHeads(nn.Module):
    """Linear heads on the tokens: one per token (dense labels), one on the mean token (background)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dense = nn.Linear(channels, DENSE_SLICES["xy"][1])
        self.norm = nn.LayerNorm(channels)
        self.glob = nn.Linear(channels, len(BACKGROUNDS) + 2)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"dense": self.dense(tokens), "glob": self.glob(self.norm(tokens.mean(1)))}

    def loss(self, out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
        dense, glob = out["dense"], out["glob"]
        weights = {"colour": 1.0, "shape": 1.0, "size": 0.5, "centre": 1.0, "count": 0.5}
        total = sum(w * F.cross_entropy(_head(dense, k).flatten(0, 1), t[k].flatten(),
                                        weight=torch.tensor([1.0, 3.0]) if k == "centre" else None)
                    for k, w in weights.items())
        grid = math.isqrt(dense.shape[1])
        yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        xy = torch.stack([xx, yy], -1).reshape(1, -1, 2).float().add(0.5).div(grid)  # (1, T, 2) cell centres
        total = total + F.smooth_l1_loss(torch.sigmoid(_head(dense, "xy")), xy.expand(len(dense), -1, -1), beta=0.05)
        nbg = len(BACKGROUNDS)
        return total + 0.5 * F.cross_entropy(glob[:, :nbg], t["bg"]) + 0.2 * F.cross_entropy(glob[:, nbg:], t["dark"])

    @torch.no_grad()
    def accuracies(self, out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
        """(hits, total) per attribute, scored on the cells an object covers; the background per image."""
        dense = out["dense"]
        on_object = t["colour"] > 0
        hits = {}
        for k in ("colour", "shape", "size", "count"):
            pred = _head(dense, k)[..., 1:].argmax(-1) + 1  # object classes only
            hits[k] = (float((pred == t[k])[on_object].sum()), int(on_object.sum()))
        hits["background"] = (float((out["glob"][:, :len(BACKGROUNDS)].argmax(-1) == t["bg"]).sum()), len(dense))
        return hits


def _head(dense: torch.Tensor, name: str) -> torch.Tensor:
    lo, hi = DENSE_SLICES[name]
    return dense[..., lo:hi]


class WordHeads(nn.Module):
    """One linear scorer of every word per token; an image's score of a word is its best token's."""

    def __init__(self, channels: int, num_words: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.score = nn.Linear(channels, num_words)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"words": self.score(self.norm(tokens)).amax(1)}  # (B, T, W) -> (B, W)

    def loss(self, out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out["words"], t["words"])

    @torch.no_grad()
    def accuracies(self, out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
        """Per word decision (present or not), and the share of the images' words found."""
        said = out["words"] > 0
        truth = t["words"] > 0.5
        return {"word": (float((said == truth).sum()), truth.numel()),
                "word_recall": (float((said & truth).sum()), int(truth.sum()))}


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Phase0Data:
    """The train and val splits with their labels, and what the heads need to be built."""

    train: LabelledImages
    val: LabelledImages
    kind: str
    words: list[str]


def load_phase0_data(cfg: PretrainConfig, bb: BackboneConfig, grid: int) -> Phase0Data:
    """Read the splits and make the labels of the chosen kind."""
    splits = split_records(load_records(cfg.captions_path, cfg.images_path))
    if not splits["train"]:
        raise DatasetError(f"{cfg.captions_path} has no training images to pretrain on")
    truth_file = Path(cfg.captions_path).parent / GROUND_TRUTH_NAME
    kind = cfg.labels if cfg.labels != "auto" else ("ground_truth" if truth_file.is_file() else "words")
    words: list[str] = []
    if kind == "ground_truth":
        if not truth_file.is_file():
            raise DatasetError(f"--labels ground_truth needs {truth_file} (the synthetic dataset writes it); use "
                               "--labels words for other datasets")
        truth, side = load_ground_truth(truth_file), int(json.loads(truth_file.read_text())["image_size"])
        unknown = sorted({name for e in truth.values() for o in e["objects"] for name in (o["colour"], o["shape"])
                          if name not in COLOUR_NAMES and name not in SHAPE_NAMES}
                         | {e["background"]["kind"] for e in truth.values()} - set(BACKGROUNDS))
        if unknown:
            raise DatasetError(f"--labels ground_truth: {truth_file} has scenes of another domain than the "
                               f"quickstart's ({', '.join(unknown)}), which its heads do not know; use --labels words")
        make = lambda recs: ground_truth_targets(recs, truth, side, grid)  # noqa: E731
    else:
        words = word_list(splits["train"])
        if not words:
            raise DatasetError(f"the training captions of {cfg.captions_path} have no word naming at least "
                               f"{MIN_WORD_IMAGES} images: too few images to pretrain on words")
        make = lambda recs: word_targets(recs, words)  # noqa: E731
    parts = {name: LabelledImages(load_images(splits[name], bb.img_size), make(splits[name]))
             for name in ("train", "val")}
    return Phase0Data(parts["train"], parts["val"], kind, words)


def build_heads(data: Phase0Data, channels: int) -> nn.Module:
    return GroundTruthHeads(channels) if data.kind == "ground_truth" else WordHeads(channels, len(data.words))


class Pretrainer:
    """Phase 0's loop: AdamW with a linear warm-up, a flat stretch and a cosine decay to zero; per-epoch checkpoints
    (model, heads, optimizer, RNG) beside the output so a killed run continues; a probe of the val split each epoch."""

    def __init__(self, cfg: PretrainConfig, backbone: nn.Module, bb: BackboneConfig, data: Phase0Data,
                 device: torch.device) -> None:
        self.cfg, self.backbone, self.bb, self.data, self.device = cfg, backbone, bb, data, device
        self.heads = build_heads(data, backbone_output_shape(bb)[1]).to(device)
        params = [p for m in (backbone, self.heads) for p in m.parameters()]
        self.params = params
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)
        self.steps_per_epoch = max(1, len(data.train) // cfg.batch_size)
        self.epoch = 0
        self.folder = Path(cfg.output_path).parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_path = self.folder / "pretrain_state.pth"
        self.log = RunLog(self.folder, "phase0")

    def lr_at(self, step: int) -> float:
        return warmup_flat_cosine(step, self.cfg.lr, self.cfg.epochs * self.steps_per_epoch, self.cfg.warmup_frac,
                                  self.cfg.decay_frac)

    def run(self) -> dict[str, float]:
        """Every remaining epoch; returns the last val probe."""
        self._resume()
        probe: dict[str, float] = {}
        while self.epoch < self.cfg.epochs:
            loss = self._train_epoch()
            self.epoch += 1
            probe = self.probe(self.data.val)
            self.log.row({"type": "train", "epoch": self.epoch, "it": self.epoch * self.steps_per_epoch, "loss": loss})
            self.log.row({"type": "probe", "epoch": self.epoch, "it": self.epoch * self.steps_per_epoch, **probe})
            print(f"[phase 0] epoch {self.epoch}/{self.cfg.epochs}: loss {loss:.3f}; val "
                  + ", ".join(f"{k} {100 * v:.1f}%" for k, v in probe.items()), flush=True)
            self._checkpoint()
        self.log.close()
        return probe or self.probe(self.data.val)

    def _train_epoch(self) -> float:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.data.train), generator=gen)
        self.backbone.train()
        self.heads.train()
        running, bs = 0.0, self.cfg.batch_size
        for k in tqdm(range(self.steps_per_epoch), desc=f"phase 0 epoch {self.epoch + 1}", unit="it", leave=False):
            images, targets = self.data.train.batch(order[k * bs:(k + 1) * bs])
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr_at(self.epoch * self.steps_per_epoch + k)
            loss = self.heads.loss(self.heads(self._tokens(images)), _to(targets, self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 2.0)
            self.optimizer.step()
            running += loss.item()
        return running / self.steps_per_epoch

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.bb.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.bb.std, device=self.device).view(1, 3, 1, 1)
        pixels = (images.to(self.device).float() / 255 - mean) / std  # as data.images.preprocess
        return backbone_tokens(self.backbone, pixels)

    @torch.no_grad()
    def probe(self, split: LabelledImages, batch_size: int = 250) -> dict[str, float]:
        """The heads' accuracies on a split (what the backbone's tokens tell apart)."""
        if not len(split):
            return {}
        self.backbone.eval()
        self.heads.eval()
        sums: dict[str, list[float]] = {}
        for i in range(0, len(split), batch_size):
            images, targets = split.batch(torch.arange(i, min(i + batch_size, len(split))))
            for k, (hit, n) in self.heads.accuracies(self.heads(self._tokens(images)), _to(targets, self.device)
                                                     ).items():
                acc = sums.setdefault(k, [0.0, 0])
                acc[0], acc[1] = acc[0] + hit, acc[1] + n
        return {k: hit / max(n, 1) for k, (hit, n) in sums.items()}

    def _checkpoint(self) -> None:
        atomic_save({"epoch": self.epoch, "config": asdict(self.cfg), "backbone": self.backbone.state_dict(),
                     "heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "rng": torch.get_rng_state()}, self.state_path)

    def _resume(self) -> None:
        if not self.state_path.exists():
            return
        state = load_state_file(self.state_path)
        if state.get("config") != asdict(self.cfg):
            raise DatasetError(f"{self.state_path} belongs to a phase-0 run with other settings; delete it (or use "
                               "another output folder) to start over")
        self.backbone.load_state_dict(state["backbone"])
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        print(f"[phase 0] continuing after epoch {self.epoch} ({self.state_path})", flush=True)

    def plot(self) -> None:
        """Loss and val probe accuracies per epoch as curves.png beside the output."""
        rows = self.log.rows()
        series = {"loss": [(r["it"], r["loss"]) for r in rows if r["type"] == "train"]}
        for key in sorted({k for r in rows if r["type"] == "probe" for k in r} - {"type", "epoch", "it", "phase",
                                                                                   "time"}):
            series[f"val {key}"] = [(r["it"], r[key]) for r in rows if r["type"] == "probe" and key in r]
        save_curves(series, self.folder / "curves.png", title="phase 0: backbone pretraining")


def _to(targets: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in targets.items()}


def initial_backbone(cfg: PretrainConfig) -> tuple[nn.Module, BackboneConfig]:
    """A named size from scratch (seeded), or the weights of a backbone file; at --img_size when given."""
    torch.manual_seed(cfg.seed)
    if cfg.init in BACKBONE_SIZES:
        bb = backbone_preset(cfg.init, img_size=cfg.img_size)
        return create_backbone(bb), bb
    if not Path(cfg.init).is_file():
        raise DatasetError(f"--init {cfg.init}: neither a named backbone size ({', '.join(sorted(BACKBONE_SIZES))}) "
                           "nor a file")
    bb, state = read_backbone_file(cfg.init, img_size=cfg.img_size or None)
    if cfg.img_size:
        bb = BackboneConfig.from_dict({**bb.to_dict(), "img_size": cfg.img_size})
    backbone = create_backbone(bb)
    load_backbone_state_dict(backbone, state, cfg.init)
    return backbone, bb


def published_backbone(bb: BackboneConfig, weights: str = "") -> nn.Module:
    """bb's timm model with its published weights, loaded by timm's own code: from a local copy of them (weights),
    else from where timm publishes them when the network allows; one line saying what to do when neither works."""
    where = published_source(bb.name)
    if weights and not Path(weights).is_file():
        raise BackboneWeightsError(f"--weights {weights}: no such file")
    if not weights:
        print(f"fetching the published weights of {bb.name} through timm ({where or 'its default source'}); without "
              "a network this fails after timm's retries", flush=True)
    try:
        return create_backbone(bb, published={"file": str(weights)} if weights else {})
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        reason = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]
        if weights:
            raise BackboneWeightsError(f"--weights {weights}: timm could not load it into {bb.name} "
                                       f"({reason})") from None
        raise BackboneWeightsError(f"--pretrained: timm could not fetch the published weights of {bb.name} "
                                   f"({reason}); download them where the network allows ({where or 'see timm'}) and "
                                   "pass the file with --weights") from None


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Phase 0 from start (or from its last epoch) to the backbone file; returns what phase0.json records."""
    t0, c0 = time.perf_counter(), time.process_time()
    device = resolve_device(cfg.device)
    backbone, bb = initial_backbone(cfg)
    backbone.to(device)
    tokens, _ = backbone_output_shape(bb)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise DatasetError(f"phase 0 needs a square grid of tokens; {bb.name} at {bb.img_size} px gives {tokens}")
    data = load_phase0_data(cfg, bb, grid)
    print(f"[phase 0] {bb.name} ({sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M parameters, {tokens} "
          f"tokens) learns {data.kind.replace('_', ' ')} labels of {len(data.train)} images for {cfg.epochs} epochs "
          f"on {device}", flush=True)
    trainer = Pretrainer(cfg, backbone, bb, data, device)
    probe = trainer.run()
    save_backbone_file(cfg.output_path, backbone.eval().cpu(), bb)
    trainer.plot()
    summary = {"labels": data.kind, "words": data.words, "backbone": bb.to_dict(), "settings": asdict(cfg),
               "probe_val": probe, "wall_s": round(time.perf_counter() - t0, 1),
               "cpu_s": round(time.process_time() - c0, 1)}
    atomic_write_json(trainer.folder / "phase0.json", summary, indent=1)
    print(f"wrote {cfg.output_path}", flush=True)
    return summary
