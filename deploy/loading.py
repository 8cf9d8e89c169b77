"""Any model source -> a runtime: a training checkpoint, an official checkpoint (+ vocabulary), a model folder, an
exported ONNX folder, or a list of those (an ensemble), on the PyTorch or the ONNX Runtime backend."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.vocab import Vocabulary
from deploy.folder import FOLDER_FORMAT, is_model_folder, load_pretrained
from deploy.runtime import DECODER_FILE, CaptionRuntime, EnsembleRuntime, OrtRuntime, TorchRuntime, read_onnx_manifest
from models import ExpansionNet, ModelConfig
from models.decoding import Compile
from utils.runtime import resolve_device, resolve_precision

BACKENDS = ("auto", "torch", "onnx")
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
    from engine.checkpoints import restore_model

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


def default_onnx_cache() -> Path:
    """Where exports made for backend 'auto' / 'onnx' are kept: $XDG_CACHE_HOME (or ~/.cache)/expansionnet/onnx."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "expansionnet" / "onnx"


def resolve_backend(backend: str, kind: str, device: torch.device, precision: str, features_only: bool = False
                    ) -> str:
    """'auto': the fastest path that gives PyTorch's captions (docs/benchmarks.md): ONNX Runtime for an exported
    folder and for fp32 on the CPU from images (its backbone is faster), PyTorch from cached features on the CPU
    (features_only: its cached decoding is faster), on a GPU, and under bf16/fp16 autocast."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    cpu_fp32 = device.type == "cpu" and resolve_precision(precision, device) == "fp32"
    if kind == "onnx" or (cpu_fp32 and not features_only):
        return "onnx"
    return "torch"


def load_one(path: Source, *, backend: str = "auto", device: str | torch.device = "cpu", precision: str = "auto",
             vocab: Source | None = None, features_only: bool = False, threads: int | None = None,
             onnx_cache: Source | None = None, compile: Compile = False) -> LoadedModel:
    """One model source on one backend (see resolve_backend for 'auto'). ONNX Runtime on a PyTorch source exports
    it first (fp32, or fp16 when precision is fp16) into onnx_cache/<weights digest>-<precision>/ (default:
    default_onnx_cache()), reused by later loads of the same weights. compile: torch.compile the PyTorch encoder
    and decoding step (see TorchRuntime); backend 'auto' then means PyTorch."""
    path = Path(path)
    kind = source_kind(path)
    dev = resolve_device(device)
    if compile:
        if backend not in ("auto", "torch"):
            raise ValueError(f"compile applies to the PyTorch backend, not {backend!r}")
        backend = "torch"
    backend = resolve_backend(backend, kind, dev, precision, features_only)
    if kind == "onnx":
        if backend == "torch":
            raise ValueError(f"{path} is an exported ONNX folder: it holds no PyTorch weights; load it with "
                             "backend='onnx' (or convert the training checkpoint with export.py --format folder)")
        if features_only and read_onnx_manifest(path)["io"]["encoder_input"] == "images":
            raise ValueError(f"{path} was exported end to end (its encoder graph takes images), so it cannot caption "
                             "cached features; export the features model (export.py --features_only)")
        runtime = OrtRuntime(path, dev, threads=threads)
        vocab_obj = Vocabulary.load(path / "vocab.json")
        if len(vocab_obj) != runtime.vocab_size:
            raise ValueError(f"{path}: vocab.json has {len(vocab_obj)} tokens, the model {runtime.vocab_size}")
        return LoadedModel(runtime, vocab_obj, [path], read_onnx_manifest(path).get("training", {}))
    model, config, vocab_obj, ckpt, official = _torch_model(path, kind, vocab, features_only)
    if backend == "onnx":
        from utils.checkpoint import state_dict_sha256

        onnx_precision = "fp16" if precision == "fp16" else "fp32"
        cache = Path(onnx_cache) if onnx_cache is not None else default_onnx_cache()
        target = cache / f"{state_dict_sha256(model.state_dict())[:16]}-{onnx_precision}"
        if not (target / "config.json").is_file():  # config.json is written last: a finished export
            print(f"exporting {path} to ONNX once, into {target} (later loads of these weights reuse it)",
                  file=sys.stderr, flush=True)
            _export_atomically(model, config, vocab_obj, target, onnx_precision, str(path))
        runtime = OrtRuntime(target, dev, threads=threads)
        return LoadedModel(runtime, vocab_obj, [path], ckpt, official)
    runtime = TorchRuntime.for_captioning(model, config, dev, precision, compile=compile)
    return LoadedModel(runtime, vocab_obj, [path], ckpt, official, model=runtime.model)


def _export_atomically(model: ExpansionNet, config: ModelConfig, vocab: Vocabulary, target: Path, precision: str,
                       source: str) -> None:
    """Export into a folder of this process, then rename it into place: processes that load the same weights at once
    (evaluation shards, server workers) never see half an export, and the first to finish wins."""
    from deploy.onnx_export import export_onnx

    work = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    export_onnx(model, config, vocab, work, precision=precision, source=source)
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


__all__ = ["BACKENDS", "FOLDER_FORMAT", "LoadedModel", "load_model", "load_one", "source_kind", "training_facts"]
