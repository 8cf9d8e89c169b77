"""Feature generation under torchrun: shards cut at batch boundaries, joined into the one-process file; resume of a
killed rank; a disk check that counts every shard and the joined file; refusals of leftovers of other runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, make_tiny_dataset
from processes import run_watched

import data_generator
from data import features as feature_files
from data.features import (
    FeatureFileError,
    FeatureReader,
    FeatureWriter,
    check_disk_space_for_shards,
    join_feature_shards,
    partial_path,
    shard_path,
)
from engine.features import GeneratorConfig, _prepare_shards, shard_ranges

ATTRS = {"backbone_name": "x", "backbone_config": {"name": "x", "img_size": 32, "overrides": {}}, "img_size": 32,
         "batch_size": 3}


@pytest.mark.parametrize("n,world,batch", [(56, 2, 4), (10, 3, 3), (7, 4, 4), (1, 2, 8), (100, 8, 1), (9, 1, 4)])
def test_shards_are_contiguous_whole_batches_covering_every_image(n, world, batch):
    ranges = shard_ranges(n, world, batch)
    assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(lo % batch == 0 and (hi == n or hi % batch == 0) for lo, hi in ranges)
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= batch  # as even as whole batches allow


def _write(path: Path, feats: np.ndarray, valid: np.ndarray, ids: list[int], batch: int = 3,
           attrs: dict | None = None) -> Path:
    w = FeatureWriter(path, ids, feats.shape[1], feats.shape[2], "fp16", attrs or ATTRS)
    for i in range(0, len(ids), batch):
        w.append(feats[i:i + batch], valid[i:i + batch])
    w.finish()
    return path


def _contents(path: Path) -> dict:
    with h5py.File(path) as f:
        out = {k: f[k][()] for k in ("features", "image_ids", "valid")}
        out["layout"] = (f["features"].chunks, f["features"].compression, f["features"].dtype, f["valid"].fillvalue)
        out["attrs"] = {k: str(v) for k, v in f.attrs.items()}
    return out


def _assert_same_file(a: Path, b: Path) -> None:
    x, y = _contents(a), _contents(b)
    for k in ("features", "image_ids", "valid"):
        assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
    assert x["layout"] == y["layout"]
    assert x["attrs"] == y["attrs"]


def test_joined_shards_are_the_one_process_file_and_keep_raw_chunk_reads(tmp_path):
    rng = np.random.default_rng(0)
    n, world, batch = 11, 3, 3
    feats = rng.standard_normal((n, 4, 6)).astype(np.float32)
    valid = np.ones(n, bool)
    valid[[2, 9]] = False
    ids = [100 + 7 * i for i in range(n)]
    one = _write(tmp_path / "one.hdf5", feats, valid, ids, batch)
    out = tmp_path / "f.hdf5"
    ranges = shard_ranges(n, world, batch)
    shards = [_write(shard_path(out, r, world), feats[lo:hi], valid[lo:hi], ids[lo:hi], batch)
              for r, (lo, hi) in enumerate(ranges)]
    feature_files.join_partial_path(out).write_bytes(b"a join killed half-way")  # redone, not trusted
    join_feature_shards(out, shards, ids)
    _assert_same_file(one, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.hdf5", "one.hdf5"]
    reader = FeatureReader(out)
    with h5py.File(out) as f:  # the reader's raw chunk path applies
        ds = f["features"]
        assert ds.chunks == (1,) + ds.shape[1:] and ds.compression is None and ds.id.read_direct_chunk((5, 0, 0))
    got = reader.read([ids[10], ids[0], ids[5]]).numpy()
    np.testing.assert_array_equal(got, feats[[10, 0, 5]].astype(np.float16).astype(np.float32))
    assert not reader.has(ids[2]) and not reader.has(ids[9]) and reader.has(ids[3])


def test_join_refuses_shards_of_another_job_out_of_order_or_incomplete(tmp_path):
    feats, valid, ids = np.zeros((4, 2, 2), np.float32), np.ones(4, bool), [1, 2, 3, 4]
    out = tmp_path / "f.hdf5"
    a = _write(shard_path(out, 0, 2), feats[:2], valid[:2], ids[:2])
    b = _write(shard_path(out, 1, 2), feats[2:], valid[2:], ids[2:], attrs={**ATTRS, "img_size": 64})
    with pytest.raises(FeatureFileError, match="another job.*img_size"):
        join_feature_shards(out, [a, b], ids)
    b.unlink()
    b = _write(shard_path(out, 1, 2), feats[2:], valid[2:], ids[2:])
    with pytest.raises(FeatureFileError, match="do not hold the 4 images.*in order"):
        join_feature_shards(out, [b, a], ids)
    w = FeatureWriter(tmp_path / "c.hdf5", ids[2:], 2, 2, "fp16", ATTRS)
    w.close()
    with pytest.raises(FeatureFileError, match="not a complete feature shard"):
        join_feature_shards(out, [a, partial_path(tmp_path / "c.hdf5")], ids)
    assert not out.exists() and a.exists() and b.exists()
    join_feature_shards(out, [a, b], ids)
    with pytest.raises(FileExistsError, match="--overwrite"):
        join_feature_shards(out, [a, b], ids)


def test_disk_check_counts_every_shard_and_the_joined_file(tmp_path, monkeypatch):
    out, rows = tmp_path / "f.hdf5", [28, 28]
    shards = [shard_path(out, r, 2) for r in range(2)]
    size = feature_files.required_bytes(56, 16, 32, "fp16")
    free = {"bytes": 2 * size - 1}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, free["bytes"]))
    with pytest.raises(OSError, match=r"not enough disk space for .*f\.hdf5 written by 2 processes: needs"):
        check_disk_space_for_shards(out, shards, rows, 16, 32, "fp16")
    free["bytes"] = 2 * size
    assert check_disk_space_for_shards(out, shards, rows, 16, 32, "fp16") == 2 * size
    partial_path(shards[0]).write_bytes(b"\0" * 1000)  # what an interrupted run wrote is not needed again
    assert check_disk_space_for_shards(out, shards, rows, 16, 32, "fp16") == 2 * size - 1000


def test_leftovers_of_a_run_with_another_number_of_processes_are_found(tmp_path):
    out = tmp_path / "f.hdf5"
    for name in ("f.hdf5.rank0-of-2", "f.hdf5.rank1-of-2.partial", "f.hdf5.rank3-of-4.partial", "f.hdf5.partial",
                 "g.hdf5.rank0-of-3", "f.hdf5.rank0-of-2.partial.bak"):
        (tmp_path / name).write_bytes(b"")
    names = lambda world: [p.name for p in feature_files.leftover_files(out, world)]  # noqa: E731
    assert names(2) == ["f.hdf5.partial", "f.hdf5.rank3-of-4.partial"]
    assert names(4) == ["f.hdf5.partial", "f.hdf5.rank0-of-2", "f.hdf5.rank1-of-2.partial"]
    assert names(1) == ["f.hdf5.rank0-of-2", "f.hdf5.rank1-of-2.partial", "f.hdf5.rank3-of-4.partial"]


def test_main_process_checks_before_any_shard_is_written(tmp_path, monkeypatch):
    """What rank 0 keeps, removes or refuses before the processes start on their shards."""
    out, ids = tmp_path / "f.hdf5", list(range(1, 12))
    feats, valid = np.zeros((11, 2, 2), np.float32), np.ones(11, bool)
    meta = {**ATTRS, "tokens": 2, "channels": 2, "dtype": "fp16"}
    cfg = GeneratorConfig(backbone="b", output_path=str(out), images_path="i", captions_path="c", batch_size=3)
    ranges = shard_ranges(11, 2, 3)  # [0, 6) and [6, 11)
    prepare = lambda c=cfg: _prepare_shards(c, meta, ids, ranges, 2, 2)  # noqa: E731

    done = _write(shard_path(out, 0, 2), feats[:6], valid[:6], ids[:6])  # a complete shard of this job: kept
    partial_path(shard_path(out, 1, 2)).write_bytes(b"killed while its header was written")  # unreadable: removed
    feature_files.join_partial_path(out).write_bytes(b"half a join")  # redone
    prepare()
    assert sorted(p.name for p in tmp_path.iterdir()) == [done.name]

    partial_path(out).write_bytes(b"")  # a one-process run's partial file
    with pytest.raises(FileExistsError, match="interrupted run with one process.*--overwrite to start over with 2"):
        prepare()
    prepare(GeneratorConfig(**{**cfg.__dict__, "overwrite": True}))
    assert not partial_path(out).exists() and done.exists()

    other = GeneratorConfig(**{**cfg.__dict__, "batch_size": 2})  # cuts [0, 6) and [6, 11) too: the shard is kept
    _prepare_shards(other, meta, ids, shard_ranges(11, 2, 2), 2, 2)
    assert done.exists()
    other = GeneratorConfig(**{**cfg.__dict__, "batch_size": 4})  # cuts [0, 4): the shard is of another cut
    with pytest.raises(FileExistsError, match="cut for --batch_size 3.*rerun with --batch_size 3"):
        _prepare_shards(other, meta, ids, shard_ranges(11, 2, 4), 2, 2)
    with pytest.raises(FileExistsError, match="different job"):
        _prepare_shards(cfg, {**meta, "weights_sha256": "other"}, ids, ranges, 2, 2)

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, 10))
    with pytest.raises(OSError, match="not enough disk space"):
        prepare()
    monkeypatch.undo()
    out.write_bytes(b"")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        prepare()


# --- two gloo processes under torchrun ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    """A 56-image dataset and its one-process feature file (one thread, as torchrun gives each process)."""
    root = tmp_path_factory.mktemp("sharded")
    captions, backbone = make_tiny_dataset(root, num_train=40)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = data_generator.main(data_generator.parse_config(_gen_args(captions, backbone, root / "one.hdf5")))
    finally:
        torch.set_num_threads(threads)
    return {"captions": captions, "backbone": backbone, "ref": ref}


def _gen_args(captions: Path, backbone: Path, out: Path) -> list[str]:
    return ["--save_model_path", str(backbone), "--output_path", str(out), "--images_path", str(captions.parent),
            "--captions_path", str(captions), "--batch_size", "4", "--num_workers", "0", "--device", "cpu"]


def _torchrun(tmp_path: Path, args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """data_generator.py in 2 gloo processes on this machine, after prelude (test hooks) in each."""
    script = tmp_path / "gen_under_test.py"
    script.write_text(f"import runpy, sys\nsys.path.insert(0, {str(ROOT)!r})\n{prelude}\n"
                      f"sys.argv = ['data_generator.py', *{args!r}]\n"
                      f"runpy.run_path({str(ROOT / 'data_generator.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_watched([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=ROOT, env=env)


@pytest.mark.slow
def test_two_gloo_processes_write_the_one_process_file_when_shards_and_file_fit(generated, tmp_path):
    g = generated
    out = tmp_path / "f.hdf5"
    args = _gen_args(g["captions"], g["backbone"], out)
    size = feature_files.required_bytes(56, 16, 32, "fp16")
    too_small = ("import shutil\n_usage = shutil.disk_usage\n"
                 f"shutil.disk_usage = lambda p: _usage(p)._replace(free={2 * size - 1})\n")
    refused = _torchrun(tmp_path, args, too_small)
    assert refused.returncode != 0 and "not enough disk space" in refused.stdout + refused.stderr
    assert not any(p.name.startswith("f.hdf5") for p in tmp_path.iterdir())
    done = _torchrun(tmp_path, args, too_small.replace(str(2 * size - 1), str(2 * size)))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_file(g["ref"], out)
    assert not any(p.name.startswith("f.hdf5.") for p in tmp_path.iterdir())  # shards removed after the join
    FeatureReader(out).read([int(i) for i in h5py.File(out)["image_ids"][:3]])


@pytest.mark.slow
def test_a_rank_killed_mid_shard_resumes_to_the_one_process_file(generated, tmp_path):
    g = generated
    out = tmp_path / "f.hdf5"
    args = _gen_args(g["captions"], g["backbone"], out)
    # rank 1 kills itself with SIGKILL in the middle of its 3rd batch, after its feature rows were written; torchrun
    # then stops rank 0 wherever it is
    killer = ("import os, signal\nimport data.features as F\norig = F.FeatureWriter.append\n"
              "def append(self, feats, valid=None):\n"
              "    if os.environ['RANK'] == '1' and self.num_written == 8:\n"
              "        self._file['features'][8:12] = feats\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return orig(self, feats, valid)\n"
              "F.FeatureWriter.append = append\n")
    killed = _torchrun(tmp_path, args, killer)
    assert killed.returncode != 0
    assert not out.exists() and partial_path(shard_path(out, 1, 2)).exists()
    done = _torchrun(tmp_path, args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1: resuming after 8 of its 28 images" in done.stdout or "starting that shard over" in done.stdout
    _assert_same_file(g["ref"], out)
    assert not any(p.name.startswith("f.hdf5.") for p in tmp_path.iterdir())
