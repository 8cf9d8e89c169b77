"""The HDF5 feature cache and data_generator.py: round trip, refusals, resume after a kill."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, make_tiny_dataset
from processes import run_watched

import data_generator
from data.features import FeatureFileError, FeatureReader, FeatureWriter, inspect_feature_file

ATTRS = {"backbone_name": "x", "backbone_config": {"name": "x", "img_size": 32, "overrides": {}}, "img_size": 32}


def _write(path: Path, feats: np.ndarray, ids: list[int], dtype: str = "fp16", batch: int = 3) -> None:
    w = FeatureWriter(path, ids, feats.shape[1], feats.shape[2], dtype, ATTRS)
    for i in range(0, len(ids), batch):
        w.append(feats[i:i + batch])
    w.finish()


@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-3), ("fp32", 0.0)])
def test_feature_file_round_trip_in_any_order(tmp_path, dtype, tol):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((10, 4, 6)).astype(np.float32)
    ids = [100 + 7 * i for i in range(10)]
    path = tmp_path / "f.hdf5"
    _write(path, feats, ids, dtype)
    with h5py.File(path) as f:
        assert f["features"].shape == (10, 4, 6) and f["features"].chunks == (1, 4, 6)
        assert f["features"].dtype == (np.float16 if dtype == "fp16" else np.float32)
    reader = FeatureReader(path)
    order = [ids[7], ids[2], ids[7], ids[0]]
    got = reader.read(order).numpy()
    np.testing.assert_allclose(got, feats[[7, 2, 7, 0]], atol=tol, rtol=tol)
    attrs = inspect_feature_file(path)
    assert attrs["complete"] and attrs["backbone_config"]["img_size"] == 32 and attrs["dtype"] == dtype
    assert not (tmp_path / "f.hdf5.partial").exists()


def test_feature_file_of_another_backbone_or_width_is_refused(tmp_path):
    path = tmp_path / "f.hdf5"
    _write(path, np.zeros((2, 4, 6), np.float32), [1, 2])
    reader = FeatureReader(path)
    with pytest.raises(FeatureFileError, match="6-channel features but the model expects img_feature_dim 8"):
        reader.check_matches(None, 8)
    with pytest.raises(FeatureFileError, match="another backbone.*img_size: file 32 vs model 64"):
        reader.check_matches({"name": "x", "img_size": 64, "overrides": {}}, 6)
    reader.check_matches({"name": "x", "img_size": 32, "overrides": {}}, 6)
    with pytest.raises(FeatureFileError, match="image id 99 is not in feature file"):
        reader.read([99])


def test_complete_file_is_never_overwritten_and_incomplete_is_not_read(tmp_path):
    path = tmp_path / "f.hdf5"
    _write(path, np.ones((2, 4, 6), np.float32), [1, 2])
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        FeatureWriter(path, [1, 2], 4, 6, "fp16", ATTRS)
    assert path.read_bytes() == before
    w = FeatureWriter(tmp_path / "g.hdf5", [1, 2], 4, 6, "fp16", ATTRS)
    w.append(np.ones((1, 4, 6), np.float32))
    w.close()
    with pytest.raises(FeatureFileError, match="does not exist"):
        FeatureReader(tmp_path / "g.hdf5")


def test_not_enough_disk_space_is_refused_with_both_sizes(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    with pytest.raises(OSError, match=r"needs 0\.00 GB, 0\.00 GB free|needs .* GB, .* GB free"):
        FeatureWriter(tmp_path / "f.hdf5", list(range(100)), 144, 1024, "fp16", ATTRS)
    assert not any(tmp_path.iterdir())


def test_rows_of_unreadable_images_are_skipped_by_readers(tmp_path):
    path = tmp_path / "f.hdf5"
    w = FeatureWriter(path, [1, 2, 3], 2, 2, "fp32", ATTRS)
    w.append(np.ones((3, 2, 2), np.float32), np.array([True, False, True]))
    w.finish()
    reader = FeatureReader(path)
    assert reader.has(1) and not reader.has(2) and reader.has(3)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_dataset(tmp_path_factory.mktemp("gen"), num_train=40)


def _gen_args(captions: Path, backbone: Path, out: Path, batch: int = 4) -> list[str]:
    return ["--save_model_path", str(backbone), "--output_path", str(out), "--images_path", str(captions.parent),
            "--captions_path", str(captions), "--batch_size", str(batch), "--num_workers", "0"]


def test_data_generator_writes_every_image_with_its_provenance(small_dataset, tmp_path):
    captions, backbone = small_dataset
    out = data_generator.main(data_generator.parse_config(_gen_args(captions, backbone, tmp_path / "f.hdf5")))
    attrs = inspect_feature_file(out)
    assert attrs["num_images"] == 56 and attrs["num_written"] == 56 and attrs["complete"]
    assert attrs["tokens"] == 16 and attrs["channels"] == 32 and attrs["dtype"] == "fp16"
    assert attrs["backbone_config"]["overrides"]["embed_dim"] == 16 and len(attrs["weights_sha256"]) == 64
    assert attrs["source_checkpoint"].endswith("bb.pth")
    with pytest.raises(FileExistsError):
        data_generator.main(data_generator.parse_config(_gen_args(captions, backbone, out)))


@pytest.mark.slow
def test_data_generator_killed_half_way_resumes_to_an_identical_file(small_dataset, tmp_path):
    captions, backbone = small_dataset
    ref = data_generator.main(data_generator.parse_config(_gen_args(captions, backbone, tmp_path / "ref.hdf5", 2)))
    out = tmp_path / "f.hdf5"
    args = _gen_args(captions, backbone, out, 2)
    # the process kills itself with SIGKILL in the middle of its 6th batch, after its feature rows were written
    killer = (
        "import os, signal, sys; import data.features as F; import data_generator as G\n"
        "orig = F.FeatureWriter.append\n"
        "def append(self, feats, valid=None):\n"
        "    if self.num_written == 10:\n"
        "        self._file['features'][10:12] = feats\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(self, feats, valid)\n"
        "F.FeatureWriter.append = append\n"
        f"G.main(G.parse_config({args!r}))\n")
    killed = run_watched([sys.executable, "-c", killer], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    cmd = [sys.executable, "data_generator.py", *args]
    assert not out.exists() and (tmp_path / "f.hdf5.partial").exists()
    done = run_watched(cmd, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "resuming after" in done.stdout or "starting it over" in done.stderr
    with h5py.File(ref) as a, h5py.File(out) as b:
        assert np.array_equal(a["features"][()], b["features"][()])
        assert np.array_equal(a["image_ids"][()], b["image_ids"][()])
        assert json.loads(a.attrs["backbone_config"]) == json.loads(b.attrs["backbone_config"])
