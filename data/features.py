"""The HDF5 feature cache: one contiguous (N, tokens, channels) dataset chunked by image, plus an id index.

Attributes record what produced the features (backbone name and config, weights hash, image size, dtype, source
checkpoint) so training can refuse a file that does not match its model, and how far writing got so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch

if TYPE_CHECKING:
    from data.records import ImageRecord

FEATURES_FORMAT = "expansionnet-features"
FEATURES_VERSION = 1
DTYPES = {"fp16": np.float16, "fp32": np.float32}


class FeatureFileError(ValueError):
    """A feature file that is missing, incomplete or does not match the model; the message names the file."""


def required_bytes(num_images: int, tokens: int, channels: int, dtype: str) -> int:
    """Size of the features dataset: N x tokens x channels x itemsize."""
    return num_images * tokens * channels * np.dtype(DTYPES[dtype]).itemsize


def _attr_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


def _create_layout(f: h5py.File, image_ids: Sequence[int], tokens: int, channels: int, dtype: Any) -> None:
    """The datasets of a feature file: features chunked by image (uncompressed, so readers copy chunks raw), the id
    index and the valid mask."""
    f.create_dataset("features", shape=(len(image_ids), tokens, channels), dtype=dtype, chunks=(1, tokens, channels))
    f.create_dataset("image_ids", data=np.asarray(image_ids, dtype=np.int64))
    f.create_dataset("valid", shape=(len(image_ids),), dtype=bool, fillvalue=False)


def same_job(path: str | Path, meta: dict[str, Any], image_ids: Sequence[int]) -> bool:
    """Whether the feature file (partial or complete) at path was made by the job of meta (the writer's attributes
    with tokens, channels and dtype; batch_size may differ) over these image ids. Raises OSError, KeyError or
    FeatureFileError when the file cannot be read as a feature file."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FEATURES_FORMAT:
            raise FeatureFileError(f"{path} is not a feature file")
        for k, v in meta.items():
            if k == "batch_size":
                continue
            stored = f.attrs.get(k)
            if stored is None or str(stored) != str(_attr_value(v)):
                return False
        return np.array_equal(f["image_ids"][()], np.asarray(image_ids, dtype=np.int64))


class FeatureWriter:
    """Writes `<path>.partial` in a fixed image order and renames it to `<path>` once complete.

    A rerun of the same job resumes the partial file; an unreadable partial file (a kill during a write) is started
    over; a complete file is never replaced without overwrite.
    """

    def __init__(self, path: str | Path, image_ids: Sequence[int], tokens: int, channels: int, dtype: str,
                 attrs: dict[str, Any], overwrite: bool = False) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        meta = {**attrs, "tokens": tokens, "channels": channels, "dtype": dtype}
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists; pass --overwrite to replace it")
        if self.partial.exists():
            try:
                same = self._same_job(meta, image_ids)
            except (OSError, KeyError, FeatureFileError):
                warnings.warn(f"{self.partial} is unreadable (interrupted during a write?): starting it over",
                              stacklevel=2)
                self.partial.unlink()
            else:
                if not same and not overwrite:
                    raise FileExistsError(f"{self.partial} is a partial feature file of a different job (other "
                                          "backbone, images or dtype); pass --overwrite to replace it, or choose "
                                          "another output path")
                if not same:
                    self.partial.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.partial.exists():
            needed = required_bytes(len(image_ids), tokens, channels, dtype)
            free = shutil.disk_usage(self.path.parent).free
            if needed > free:
                raise OSError(f"not enough disk space for {self.path}: needs {needed / 1e9:.2f} GB, "
                              f"{free / 1e9:.2f} GB free")
            with h5py.File(self.partial, "w") as f:
                _create_layout(f, image_ids, tokens, channels, DTYPES[dtype])
                f.attrs["format"] = FEATURES_FORMAT
                f.attrs["format_version"] = FEATURES_VERSION
                for k, v in meta.items():
                    f.attrs[k] = _attr_value(v)
                f.attrs["num_written"] = 0
                f.attrs["complete"] = False
        self._file = h5py.File(self.partial, "r+")
        self.num_written = int(self._file.attrs["num_written"])
        self.total = len(image_ids)

    def _same_job(self, meta: dict[str, Any], image_ids: Sequence[int]) -> bool:
        return same_job(self.partial, meta, image_ids)

    def append(self, features: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write the next rows (B, tokens, channels) and record progress (flushed, so a kill loses nothing written).

        valid (B,) marks rows whose image could be read; the others stay in the file but readers skip them.
        """
        n = features.shape[0]
        ds = self._file["features"]
        ds[self.num_written:self.num_written + n] = features.astype(ds.dtype, copy=False)
        self._file["valid"][self.num_written:self.num_written + n] = True if valid is None else valid
        self.num_written += n
        self._file.attrs["num_written"] = self.num_written
        self._file.flush()

    def finish(self) -> None:
        """Mark complete and move into place (replacing an existing file only when overwrite was given)."""
        if self.num_written != self.total:
            raise RuntimeError(f"{self.partial}: wrote {self.num_written} of {self.total} images")
        self._file.attrs["complete"] = True
        self._file.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


def partial_path(path: str | Path) -> Path:
    """Where FeatureWriter writes path until it is complete."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def shard_path(path: str | Path, rank: int, world: int) -> Path:
    """The complete shard of one process of a multi-process run, next to the output: `features.hdf5.rank0-of-8`
    (written as `features.hdf5.rank0-of-8.partial`)."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank{rank}-of-{world}")


def join_partial_path(path: str | Path) -> Path:
    """Where join_feature_shards writes path until the join is complete."""
    path = Path(path)
    return path.with_name(path.name + ".join.partial")


def leftover_files(path: str | Path, world: int) -> list[Path]:
    """Files next to path that an interrupted run with another number of processes left (its shards, or the
    one-process `.partial`): a run with `world` processes can neither resume nor use them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    shard = re.compile(rf"{re.escape(path.name)}\.rank(\d+)-of-(\d+)(\.partial)?")
    out = []
    for p in sorted(path.parent.iterdir()):
        m = shard.fullmatch(p.name)
        if (m and int(m.group(2)) != world) or (world > 1 and p.name == path.name + ".partial"):
            out.append(p)
    return out


def check_disk_space_for_shards(path: str | Path, shards: Sequence[Path], shard_rows: Sequence[int], tokens: int,
                                channels: int, dtype: str) -> int:
    """Refuse (OSError) a multi-process run whose shards and joined file would not fit on the output's disk.

    The shards and the joined file are on disk together while the main process joins them, so the run needs twice
    the file's size, less what an interrupted run already wrote to its shards. Returns the bytes still needed.
    """
    path = Path(path)
    final = required_bytes(sum(shard_rows), tokens, channels, dtype)
    needed = final
    for shard, rows in zip(shards, shard_rows):
        written = max((p.stat().st_size for p in (shard, partial_path(shard)) if p.exists()), default=0)
        needed += max(0, required_bytes(rows, tokens, channels, dtype) - written)
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise OSError(f"not enough disk space for {path} written by {len(shards)} processes: needs "
                      f"{needed / 1e9:.2f} GB (its shards and the joined file, {final / 1e9:.2f} GB each, are on disk "
                      f"together while they are joined), {free / 1e9:.2f} GB free")
    return needed


def join_feature_shards(path: str | Path, shards: Sequence[Path], image_ids: Sequence[int],
                        overwrite: bool = False) -> Path:
    """Join complete shard files, in order, into the feature file at path, then remove them.

    The result is the file one process would have written: the same datasets, chunked by image and uncompressed (so
    FeatureReader keeps its raw chunk reads), the shards' attributes, every chunk copied raw (bit for bit). It is
    written as `<path>.join.partial` and renamed when complete; a leftover one (a kill during a join) is started over.
    The shards must hold image_ids in order and come from the same job.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    tmp = join_partial_path(path)
    tmp.unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        files = []
        for shard in shards:
            try:
                files.append(stack.enter_context(h5py.File(shard, "r")))
            except OSError as e:
                raise FeatureFileError(f"feature shard {shard} cannot be read: {e}") from e
        first = files[0]
        job = {k: str(v) for k, v in first.attrs.items() if k not in ("num_written", "complete")}
        for shard, f in zip(shards, files):
            if f.attrs.get("format") != FEATURES_FORMAT or not f.attrs.get("complete"):
                raise FeatureFileError(f"{shard} is not a complete feature shard")
            other = {k: str(v) for k, v in f.attrs.items() if k not in ("num_written", "complete")}
            diff = sorted(k for k in job.keys() | other.keys() if job.get(k) != other.get(k))
            ds = f["features"]
            if diff or ds.shape[1:] != first["features"].shape[1:] or ds.dtype != first["features"].dtype:
                raise FeatureFileError(f"{shard} was made by another job than {shards[0]} (differs in "
                                       f"{', '.join(diff) or 'shape or dtype'})")
            if ds.chunks != (1,) + ds.shape[1:] or ds.compression is not None:
                raise FeatureFileError(f"{shard} is not chunked by image")
        ids = np.concatenate([f["image_ids"][()] for f in files])
        if not np.array_equal(ids, np.asarray(image_ids, dtype=np.int64)):
            raise FeatureFileError(f"the shards {shards[0]}... do not hold the {len(image_ids)} images of {path} in "
                                   "order")
        src0 = first["features"]
        with h5py.File(tmp, "w") as out:
            _create_layout(out, ids, src0.shape[1], src0.shape[2], src0.dtype)
            for k, v in first.attrs.items():
                out.attrs[k] = v
            out.attrs["num_written"] = 0
            out.attrs["complete"] = False
            dst, row = out["features"], 0
            for f in files:
                src, n = f["features"], f["features"].shape[0]
                for r in range(n):
                    mask, chunk = src.id.read_direct_chunk((r, 0, 0))
                    dst.id.write_direct_chunk((row + r, 0, 0), chunk, mask)
                out["valid"][row:row + n] = f["valid"][()]
                row += n
            out.attrs["num_written"] = row
            out.attrs["complete"] = True
    os.replace(tmp, path)
    for shard in shards:
        shard.unlink()
    return path


def inspect_feature_file(path: str | Path) -> dict[str, Any]:
    """Attributes of a feature file (JSON values decoded), with clear errors for non-feature files."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"feature file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FEATURES_FORMAT:
                raise FeatureFileError(f"{path} is not a feature file written by data_generator.py (the reference's "
                                       "per-image layout is not supported: regenerate the features)")
            out = {}
            for k, v in f.attrs.items():
                if isinstance(v, str) and v[:1] in "[{":
                    try:
                        v = json.loads(v)
                    except json.JSONDecodeError:
                        pass
                out[k] = v.item() if isinstance(v, np.generic) else v
            out["num_images"] = f["image_ids"].shape[0]
            return out
    except OSError as e:
        raise FeatureFileError(f"{path} is not a readable HDF5 file: {e}") from e


class FeatureReader:
    """Random access to cached features by image id; opens the file lazily (one handle per DataLoader worker)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.attrs = inspect_feature_file(self.path)
        if not self.attrs.get("complete"):
            raise FeatureFileError(f"{self.path} is incomplete ({self.attrs.get('num_written')} of "
                                   f"{self.attrs['num_images']} images): rerun data_generator.py to finish it")
        with h5py.File(self.path, "r") as f:
            ids = f["image_ids"][()]
            valid = f["valid"][()]
        self.row_of = {int(i): r for r, (i, ok) in enumerate(zip(ids, valid)) if ok}
        self._file: h5py.File | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"] = None  # h5py handles do not cross process boundaries
        return state

    @property
    def tokens(self) -> int:
        return int(self.attrs["tokens"])

    @property
    def channels(self) -> int:
        return int(self.attrs["channels"])

    def has(self, image_id: int) -> bool:
        return image_id in self.row_of

    def keep_present(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        """The records whose features are in the file; a warning counts the others (unreadable when it was made)."""
        kept = [r for r in records if self.has(r.image_id)]
        if len(kept) < len(records):
            missing = next(r for r in records if not self.has(r.image_id))
            warnings.warn(f"{len(records) - len(kept)} images have no features in {self.path} (unreadable when the "
                          f"file was made, e.g. {missing.path}); they are skipped", stacklevel=2)
        return kept

    def read(self, image_ids: Sequence[int]) -> torch.Tensor:
        """Features (B, tokens, channels) as float32 in the given order.

        Each image is one uncompressed chunk, read raw (h5py's fancy indexing is ~70x slower for random rows).
        """
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        try:
            rows = [self.row_of[int(i)] for i in image_ids]
        except KeyError as e:
            raise FeatureFileError(f"image id {e.args[0]} is not in feature file {self.path}") from None
        ds = self._file["features"]
        out = np.empty((len(rows),) + ds.shape[1:], dtype=ds.dtype)
        raw = ds.chunks == (1,) + ds.shape[1:] and ds.compression is None
        for i, r in enumerate(rows):
            if raw:
                out[i] = np.frombuffer(ds.id.read_direct_chunk((r, 0, 0))[1], dtype=ds.dtype).reshape(ds.shape[1:])
            else:
                out[i] = ds[r]
        return torch.from_numpy(out).float()

    def check_matches(self, backbone_config: dict[str, Any] | None, img_feature_dim: int) -> None:
        """Refuse features from another backbone (or width) than the model being trained, saying what differs."""
        if self.channels != img_feature_dim:
            raise FeatureFileError(f"{self.path} holds {self.channels}-channel features but the model expects "
                                   f"img_feature_dim {img_feature_dim}")
        if backbone_config is None:
            return
        stored = self.attrs.get("backbone_config")
        keys = ("name", "img_size", "overrides")
        diffs = [f"{k}: file {stored.get(k)!r} vs model {backbone_config.get(k)!r}" for k in keys
                 if isinstance(stored, dict) and _norm(stored.get(k)) != _norm(backbone_config.get(k))]
        if diffs:
            raise FeatureFileError(f"{self.path} was made with another backbone than this model's: " + "; ".join(diffs))


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value)) if value is not None else None
