"""Training and evaluation batches from cached features or images: caption-wise (XE), image-wise (SCST, grouped XE).

A batch holds B images once and K captions that point at their image (caption_index), so the backbone and the
encoder run once per image even when an image brings all its captions. Samplers are deterministic per epoch,
resumable mid-epoch and sharded across processes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.features import FeatureReader
from data.images import ImageLoadError, load_image_tensor
from data.records import ImageRecord
from data.vocab import Vocabulary

if TYPE_CHECKING:
    from models.config import BackboneConfig


@dataclass
class CaptionBatch:
    """image_ids (B); images (B, 3, H, W) or features (B, N, C); tokens (K, T) SOS..EOS then PAD; caption_index (K,)
    gives each caption's image row; refs (B) the raw references of each image; skipped names unreadable images."""

    image_ids: list[int]
    images: torch.Tensor | None
    features: torch.Tensor | None
    tokens: torch.Tensor
    caption_index: torch.Tensor
    refs: list[tuple[str, ...]]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)

    def pin_memory(self) -> CaptionBatch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = True) -> CaptionBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, fn) -> CaptionBatch:
        return CaptionBatch(self.image_ids, fn(self.images) if self.images is not None else None,
                            fn(self.features) if self.features is not None else None, fn(self.tokens),
                            fn(self.caption_index), self.refs, self.skipped)


class ImageSource:
    """Where the visual input of a record comes from: the HDF5 cache, or the image file preprocessed as the
    backbone expects (its config's img_size, mean and std)."""

    def __init__(self, features: FeatureReader | None = None, backbone: BackboneConfig | None = None):
        if (features is None) == (backbone is None):
            raise ValueError("ImageSource takes either a feature file or a backbone config")
        self.features = features
        self.backbone = backbone

    def load(self, records: Sequence[ImageRecord]) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None,
                                                            list[str]]:
        """(kept positions, images, features, skipped names); unreadable images are skipped with a warning."""
        if self.features is not None:
            return list(range(len(records))), None, self.features.read([r.image_id for r in records]), []
        kept, tensors, skipped = [], [], []
        for i, r in enumerate(records):
            try:
                bb = self.backbone
                tensors.append(load_image_tensor(r.path, bb.img_size, bb.mean, bb.std, name=str(r.path)))
                kept.append(i)
            except (ImageLoadError, OSError) as e:
                warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
                skipped.append(str(r.path))
        images = torch.stack(tensors) if tensors else None
        return kept, images, None, skipped


class CaptionDataset(Dataset):
    """Batch-level dataset: __getitem__ takes the sample indices of a whole batch (one HDF5 read per batch).

    mode "caption": a sample is one (image, caption) pair (the reference's XE batches); mode "image": a sample is an
    image with all its captions (SCST, and grouped end-to-end XE where the backbone runs once per image).
    """

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary, source: ImageSource, mode: str = "caption"):
        if mode not in ("caption", "image"):
            raise ValueError(f"mode must be 'caption' or 'image', got {mode!r}")
        self.records = list(records)
        self.source = source
        self.mode = mode
        self.pad_idx = vocab.pad_idx
        self.encoded = [[vocab.encode(c) for c in r.captions] for r in self.records]
        if mode == "caption":
            self.samples = [(i, j) for i, caps in enumerate(self.encoded) for j in range(len(caps))]
        else:
            self.samples = [(i, -1) for i in range(len(self.records))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, indices: Sequence[int]) -> CaptionBatch:
        samples = [self.samples[i] for i in indices]
        image_rows: dict[int, int] = {}
        for rec, _ in samples:  # the distinct images of the batch, in order of appearance
            image_rows.setdefault(rec, len(image_rows))
        recs = list(image_rows)
        kept, images, features, skipped = self.source.load([self.records[r] for r in recs])
        new_row = {recs[k]: n for n, k in enumerate(kept)}
        captions, caption_index = [], []
        for rec, cap in samples:
            if rec not in new_row:
                continue
            chosen = self.encoded[rec] if cap < 0 else [self.encoded[rec][cap]]
            captions.extend(chosen)
            caption_index.extend([new_row[rec]] * len(chosen))
        T = max((len(c) for c in captions), default=1)
        tokens = torch.full((len(captions), T), self.pad_idx, dtype=torch.long)
        for i, c in enumerate(captions):
            tokens[i, :len(c)] = torch.tensor(c)
        kept_recs = [recs[k] for k in kept]
        return CaptionBatch([self.records[r].image_id for r in kept_recs], images, features, tokens,
                            torch.tensor(caption_index, dtype=torch.long),
                            [self.records[r].captions for r in kept_recs], skipped)


class EpochBatchSampler(Sampler[list[int]]):
    """Deterministic per-epoch shuffled batches, sharded over `world` processes, resumable at a batch index.

    A global batch of batch_size x world samples is drawn; process `rank` takes its contiguous slice, so together the
    processes see exactly what one process with the global batch would. The incomplete tail (up to a whole
    accumulation window) is dropped, as the reference drops its tail. The permutation depends only on (seed, epoch).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, accumulate: int = 1) -> None:
        if num_samples < batch_size * world * accumulate:
            raise ValueError(f"{num_samples} samples are fewer than one optimizer step ({batch_size} per batch x "
                             f"{world} processes x {accumulate} accumulated)")
        self.num_samples, self.batch_size, self.seed, self.accumulate = num_samples, batch_size, seed, accumulate
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches per epoch: whole accumulation windows only, so every optimizer step sees the same sample count."""
        return self.num_samples // (self.batch_size * self.world * self.accumulate) * self.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        global_bs = self.batch_size * self.world
        for b in range(self.start_batch, len(self)):
            start = b * global_bs + self.rank * self.batch_size
            yield order[start:start + self.batch_size]


class ShardSampler(Sampler[list[int]]):
    """Evaluation: process `rank` takes every world-th image, in order, in batches; nothing duplicated or dropped."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i:i + self.batch_size]


def make_loader(dataset: CaptionDataset, sampler: Sampler[list[int]], num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose items are whole CaptionBatches (the sampler yields the index lists).

    It gets its own generator, so creating an iterator never draws from the global RNG (a resumed run would otherwise
    see a shifted dropout stream).
    """
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=_identity, persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(0))


def _identity(batch: CaptionBatch) -> CaptionBatch:
    return batch
