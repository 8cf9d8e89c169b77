"""Any model source -> a runtime: a training checkpoint, an official checkpoint (+ vocabulary), a model folder, an
exported ONNX folder, or a list of those (an ensemble), on the PyTorch or the ONNX Runtime backend."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from data.vocab import Vocabulary
from deploy.checkpoints import restore_model
from deploy.folder import FOLDER_FORMAT, is_model_folder, load_pretrained
from deploy.onnx_export import export_onnx, verify_export
from deploy.runtime import DECODER_FILE, CaptionRuntime, EnsembleRuntime, OrtRuntime, TorchRuntime, read_onnx_manifest
from models import ExpansionNet, ModelConfig
from models.decoding import Compile
from utils.checkpoint import state_dict_sha256
from utils.cli import CheckpointOptions
from utils.runtime import resolve_device

BACKENDS = ("auto", "torch", "onnx")
DEFAULT_BACKEND = CheckpointOptions.backend  # the one default of every entry point (scripts, API, load_captioner)
ONNX_CACHE_KEEP = 3  # exports a cache folder keeps, the most recently used (each about the size of its weights)
_EXPORT_NAME = re.compile(r"[0-9a-f]{16}-(fp32|fp16)")  # <weights digest>-<precision>, as load_one names them
_WORK_NAME = re.compile(r"(?P<name>[0-9a-f]{16}-(fp32|fp16))\.tmp-(?P<pid>\d+)")
Source = str | Path


@dataclass
class LoadedModel:
    """A runtime ready to caption, its vocabulary, and what the sources record (first member's for an ensemble):
    `checkpoint` is the raw training checkpoint dict, or a folder's recorded training facts (train_config, ...)."""

    runtime: CaptionRuntime
    vocab: Vocabulary
    sources: list[Path]
    checkpoint: dict[str, Any] = field(default_factory=dict)
    official: bool = False
    # a single PyTorch model (None for ONNX and ensembles): what save_pretrained and training tools need
    model: ExpansionNet | None = None


def source_kind(path: Source) -> str:
    """'onnx' (exported folder), 'folder' (model folder), 'checkpoint' (a file); a clear error otherwise."""
    p = Path(path)
    if p.is_dir():
        if (p / DECODER_FILE).is_file():
            return "onnx"
        if is_model_folder(p):
            return "folder"
        raise FileNotFoundError(f"{p} is a folder but neither a model folder (model.safetensors + config.json) nor "
                                f"an exported ONNX folder ({DECODER_FILE} + config.json)")
    if p.is_file():
        return "checkpoint"
    raise FileNotFoundError(f"model source {p} does not exist")


def _torch_model(path: Path, kind: str, vocab: Source | None, features_only: bool
                 ) -> tuple[ExpansionNet, ModelConfig, Vocabulary, dict[str, Any], bool]:
    if kind == "checkpoint":
        r = restore_model(path, vocab_path=vocab, features_only=features_only)
        return r.model, r.config, r.vocab, r.checkpoint, r.official
    model, config, folder_vocab = load_pretrained(path)
    if vocab is not None and Vocabulary.load(vocab) != folder_vocab:
        raise ValueError(f"vocabulary {vocab} differs from {path / 'vocab.json'}; drop it to use the folder's own")
    if features_only:
        if hasattr(model, "swin_transf"):
            del model.swin_transf
        config = config.without_backbone()
    manifest = json.loads((path / "config.json").read_text())
    return model, config, folder_vocab, manifest.get("training", {}), False


@contextmanager
def long_step(what: str, stages: Sequence[str], stream: TextIO | None = None) -> Iterator[Callable[[], None]]:
    """Announce a step that takes seconds to minutes: a line saying what it does, then a bar over its stages on
    stderr (the running stage named, the seconds counting on a terminal). The yielded function ends a stage."""
    stream = stream or sys.stderr
    print(what, file=stream, flush=True)
    bar = tqdm(total=len(stages), desc=stages[0], file=stream, bar_format="  {desc} |{bar}| {n}/{total} [{elapsed}]")
    done = threading.Event()

    def tick() -> None:  # tqdm redraws only on updates: a stage of a minute would look frozen
        while not done.wait(1.0):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    if stream.isatty():
        ticker.start()

    def next_stage() -> None:
        bar.update(1)
        if bar.n < len(stages):
            bar.set_description_str(stages[bar.n])

    try:
        yield next_stage
    finally:
        done.set()
        if ticker.is_alive():
            ticker.join()
        bar.close()


def _size(path: Path) -> str:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def default_onnx_cache() -> Path:
    """Where exports made for backend 'onnx' are kept: $XDG_CACHE_HOME (or ~/.cache)/expansionnet/onnx."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "expansionnet" / "onnx"


def prune_onnx_cache(cache: Path, keep: int = ONNX_CACHE_KEEP, stream: TextIO | None = None) -> list[Path]:
    """Remove all but the `keep` most recently used exports of a cache folder, and the unfinished exports of
    processes that died, saying so for each; returns what was removed. Other files are left alone."""
    if not cache.is_dir():
        return []
    exports, dead_work = [], []
    for entry in cache.iterdir():
        work = _WORK_NAME.fullmatch(entry.name)
        if work and not _process_alive(int(work["pid"])):
            dead_work.append(entry)
        elif _EXPORT_NAME.fullmatch(entry.name) and (entry / "config.json").is_file():
            exports.append(entry)
    exports.sort(key=lambda p: p.stat().st_mtime, reverse=True)  # load_one touches an export when it uses it
    removed = []
    for entry in exports[keep:]:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.stat().st_mtime))
        print(f"removed the ONNX export {entry} ({_size(entry)}, last used {used}): {cache} keeps the {keep} most "
              "recently used exports", file=stream or sys.stderr)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    for entry in dead_work:
        print(f"removed {entry} ({_size(entry)}), an export left unfinished by a process that ended",
              file=stream or sys.stderr)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def resolve_backend(backend: str, kind: str) -> str:
    """'auto': ONNX Runtime for an exported ONNX folder, PyTorch for everything else. An export of a checkpoint
    costs minutes and about 3x PyTorch's peak memory once, for about 1.1x the speed from images at batch 1 on the CPU
    (and less than PyTorch's cached decoding from features), so it is made only when backend 'onnx' asks for it
    (docs/benchmarks.md, "First caption")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "onnx" if kind == "onnx" else "torch"


def load_one(path: Source, *, backend: str = DEFAULT_BACKEND, device: str | torch.device = "cpu",
             precision: str = "auto", vocab: Source | None = None, features_only: bool = False,
             threads: int | None = None, onnx_cache: Source | None = None, compile: Compile = False) -> LoadedModel:
    """One model source on one backend (see resolve_backend for 'auto'). ONNX Runtime on a PyTorch source exports
    it first (fp32, or fp16 when precision is fp16) into onnx_cache/<weights digest>-<precision>/ (default:
    default_onnx_cache()), reused by later loads of the same weights; the cache keeps the ONNX_CACHE_KEEP most
    recently used exports. compile: torch.compile the PyTorch encoder and decoding step (see TorchRuntime)."""
    path = Path(path)
    kind = source_kind(path)
    dev = resolve_device(device)
    if compile and backend not in ("auto", "torch"):
        raise ValueError(f"compile applies to the PyTorch backend, not {backend!r}")
    backend = resolve_backend(backend, kind)
    if kind == "onnx":
        if backend == "torch":
            raise ValueError(f"{path} is an exported ONNX folder: it holds no PyTorch weights; load it with "
                             "backend='onnx' (or convert the training checkpoint with export.py --format folder)")
        if compile:
            raise ValueError(f"compile applies to the PyTorch backend; {path} is an exported ONNX folder")
        if features_only and read_onnx_manifest(path)["io"]["encoder_input"] == "images":
            raise ValueError(f"{path} was exported end to end (its encoder graph takes images), so it cannot caption "
                             "cached features; export the features model (export.py --features_only)")
        with long_step(f"loading {path} ({_size(path)}) with ONNX Runtime on {dev}", ["opening the sessions"]) as done:
            runtime = OrtRuntime(path, dev, threads=threads)
            done()
        vocab_obj = Vocabulary.load(path / "vocab.json")
        if len(vocab_obj) != runtime.vocab_size:
            raise ValueError(f"{path}: vocab.json has {len(vocab_obj)} tokens, the model {runtime.vocab_size}")
        return LoadedModel(runtime, vocab_obj, [path], read_onnx_manifest(path).get("training", {}))
    if backend == "onnx":
        return _load_exported(path, kind, dev, precision, vocab, features_only, threads, onnx_cache)
    prepare = ["preparing it to decode on the CPU (packed weights)"] if dev.type == "cpu" else []
    with long_step(f"loading {path} ({_size(path)}) with PyTorch on {dev}",
                   ["reading the weights and building the network", *prepare]) as done:
        model, config, vocab_obj, ckpt, official = _torch_model(path, kind, vocab, features_only)
        done()
        runtime = TorchRuntime.for_captioning(model, config, dev, precision, compile=compile)
        done()
    return LoadedModel(runtime, vocab_obj, [path], ckpt, official, model=runtime.model)


def _load_exported(path: Path, kind: str, dev: torch.device, precision: str, vocab: Source | None,
                   features_only: bool, threads: int | None, onnx_cache: Source | None) -> LoadedModel:
    """A PyTorch source on ONNX Runtime: its export from the cache, made there first when missing (once per weights
    and precision), then the cache pruned to its ONNX_CACHE_KEEP most recently used exports."""
    onnx_precision = "fp16" if precision == "fp16" else "fp32"
    cache = Path(onnx_cache) if onnx_cache is not None else default_onnx_cache()
    with long_step(f"loading {path} ({_size(path)}) with PyTorch, to find or make its ONNX export",
                   ["reading the weights and building the network"]) as done:
        model, config, vocab_obj, ckpt, official = _torch_model(path, kind, vocab, features_only)
        done()
    target = cache / f"{state_dict_sha256(model.state_dict())[:16]}-{onnx_precision}"
    if not (target / "config.json").is_file():  # config.json is written last: a finished export
        with long_step(f"exporting {path} to ONNX ({onnx_precision}) once, into {target}: later loads of these "
                       f"weights reuse it; {cache} keeps the {ONNX_CACHE_KEEP} most recently used exports",
                       ["tracing the encoder and decoder-step graphs", "checking the graphs against PyTorch"]) as done:
            _export_atomically(model, config, vocab_obj, target, onnx_precision, str(path), done)
    del model  # the graphs hold their own copy of the weights: PyTorch's is not kept beside the sessions
    os.utime(target)  # the most recently used export, for prune_onnx_cache
    with long_step(f"loading {target} ({_size(target)}) with ONNX Runtime on {dev}",
                   ["opening the sessions"]) as done:
        runtime = OrtRuntime(target, dev, threads=threads)
        done()
    prune_onnx_cache(cache)
    return LoadedModel(runtime, vocab_obj, [path], ckpt, official)


def _export_atomically(model: ExpansionNet, config: ModelConfig, vocab: Vocabulary, target: Path, precision: str,
                       source: str, next_stage: Callable[[], None] = lambda: None) -> None:
    """Export into a folder of this process, check it, then rename it into place: processes that load the same weights
    at once (evaluation shards, server workers) never see half an export, and the first to finish wins."""
    work = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    model.eval()  # export_onnx gives the model back in the mode it got it; verify_export decodes in eval mode
    export_onnx(model, config, vocab, work, precision=precision, source=source, verify=False)
    next_stage()
    verify_export(work, model, config)
    next_stage()
    try:
        os.rename(work, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(work, ignore_errors=True)  # another process finished the same export first


def load_model(source: Source | Sequence[Source], **kw: Any) -> LoadedModel:
    """A source, or a list of sources for an ensemble (members must share one vocabulary, token for token;
    their backbones may differ). A list of one is that model alone. Keywords as load_one."""
    if isinstance(source, (str, Path)):
        return load_one(source, **kw)
    sources = list(source)
    if not sources:
        raise ValueError("no model source given")
    if len(sources) == 1:
        return load_one(sources[0], **kw)
    members = [load_one(s, **kw) for s in sources]
    first = members[0]
    for m in members[1:]:
        if m.vocab != first.vocab:
            raise ValueError(f"ensemble members must share one vocabulary: {m.sources[0]} has "
                             f"{_vocab_difference(first.vocab, m.vocab)} compared with {first.sources[0]}")
    runtime = EnsembleRuntime([m.runtime for m in members])
    return LoadedModel(runtime, first.vocab, [m.sources[0] for m in members], first.checkpoint, first.official)


def _vocab_difference(a: Vocabulary, b: Vocabulary) -> str:
    if len(a) != len(b):
        return f"{len(b)} tokens instead of {len(a)}"
    i = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y)
    return f"token {i} {b.tokens[i]!r} instead of {a.tokens[i]!r}"


def training_facts(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of a training checkpoint a model folder keeps: phase, train_config, train_state."""
    keep = {k: checkpoint[k] for k in ("phase", "train_config", "train_state") if k in checkpoint}
    return json.loads(json.dumps(keep, default=str))


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "FOLDER_FORMAT", "ONNX_CACHE_KEEP", "LoadedModel", "load_model", "load_one",
           "prune_onnx_cache", "source_kind", "training_facts"]
