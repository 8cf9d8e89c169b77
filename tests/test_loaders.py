"""Training batches: caption-wise and image-wise layouts, deterministic resumable sharded sampling, skipped images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vocab
from PIL import Image

from data.features import FeatureReader, FeatureWriter
from data.loaders import CaptionDataset, EpochBatchSampler, ImageSource, ShardSampler, make_loader
from data.records import ImageRecord
from models.config import tiny_swinv2


@pytest.fixture
def records(tmp_path) -> list[ImageRecord]:
    out = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (20 + i, 30), (40 * i, 10, 200)).save(path)
        caps = tuple(f"a red circle and {'two ' * (j % 2)}blue squares" for j in range(1 + i % 3))
        out.append(ImageRecord(10 + i, path, caps, "train"))
    return out


def _features(tmp_path: Path, records: list[ImageRecord]) -> FeatureReader:
    w = FeatureWriter(tmp_path / "f.hdf5", [r.image_id for r in records], 3, 4, "fp32", {"backbone_name": "x"})
    w.append(np.stack([np.full((3, 4), r.image_id, np.float32) for r in records]))
    w.finish()
    return FeatureReader(tmp_path / "f.hdf5")


def test_caption_wise_batches_point_each_caption_at_its_image(tmp_path, records):
    vocab = tiny_vocab()
    ds = CaptionDataset(records, vocab, ImageSource(features=_features(tmp_path, records)), mode="caption")
    assert len(ds) == sum(len(r.captions) for r in records)
    batch = ds[[0, 3, 1, 7]]
    pairs = [ds.samples[i] for i in [0, 3, 1, 7]]
    assert batch.features.shape == (len(batch.image_ids), 3, 4)
    for k, (rec, cap) in enumerate(pairs):  # each caption row reads the features of its own image
        row = batch.caption_index[k].item()
        assert batch.image_ids[row] == records[rec].image_id
        assert batch.features[row, 0, 0].item() == records[rec].image_id
        expected = vocab.encode(records[rec].captions[cap])
        assert batch.tokens[k, :len(expected)].tolist() == expected
        assert (batch.tokens[k, len(expected):] == vocab.pad_idx).all()
    assert len(batch.image_ids) == len({p[0] for p in pairs})  # an image appears once per batch


def test_image_wise_batches_carry_all_captions_and_references(tmp_path, records):
    ds = CaptionDataset(records, tiny_vocab(), ImageSource(backbone=tiny_swinv2(img_size=16)), mode="image")
    batch = ds[[2, 5]]
    assert batch.images.shape == (2, 3, 16, 16) and batch.features is None
    assert batch.caption_index.tolist() == [0] * len(records[2].captions) + [1] * len(records[5].captions)
    assert batch.refs == [records[2].captions, records[5].captions]


def test_unreadable_images_are_skipped_with_a_warning_naming_them(tmp_path, records):
    records[1].path.write_text("not an image")
    records[4].path.unlink()
    ds = CaptionDataset(records, tiny_vocab(), ImageSource(backbone=tiny_swinv2(img_size=16)), mode="image")
    with pytest.warns(UserWarning, match=r"skipping unreadable image.*1\.png"):
        batch = ds[list(range(6))]
    assert batch.image_ids == [10, 12, 13, 15]
    assert sorted(Path(p).name for p in batch.skipped) == ["1.png", "4.png"]
    assert batch.caption_index.max().item() == 3


def test_epoch_sampler_is_deterministic_per_epoch_and_resumes_mid_epoch():
    s = EpochBatchSampler(50, 4, seed=3)
    s.set_epoch(2)
    full = list(s)
    s2 = EpochBatchSampler(50, 4, seed=3)
    s2.set_epoch(2, start_batch=5)
    assert list(s2) == full[5:]
    s.set_epoch(3)
    assert list(s) != full
    assert len(full) == 12 and len({i for b in full for i in b}) == 48  # tail dropped, nothing repeated


def test_sharded_sampler_splits_each_global_batch_between_processes():
    single = EpochBatchSampler(40, 8, seed=1)
    single.set_epoch(0)
    ranks = [EpochBatchSampler(40, 4, seed=1, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(0)
    for global_batch, b0, b1 in zip(single, *ranks):
        assert b0 + b1 == global_batch


@pytest.mark.parametrize("n,world,bs", [(10, 3, 2), (7, 2, 5), (5, 4, 1), (3, 4, 2)])
def test_evaluation_shards_cover_every_image_exactly_once(n, world, bs):
    seen = [i for r in range(world) for b in ShardSampler(n, bs, r, world) for i in b]
    assert sorted(seen) == list(range(n))


def test_loader_with_workers_yields_pinned_ready_batches(tmp_path, records):
    ds = CaptionDataset(records, tiny_vocab(), ImageSource(features=_features(tmp_path, records)), mode="caption")
    sampler = EpochBatchSampler(len(ds), 3, seed=0)
    batches = list(make_loader(ds, sampler, num_workers=2))
    assert len(batches) == len(sampler)
    assert all(isinstance(b.tokens, torch.Tensor) and b.features is not None for b in batches)
