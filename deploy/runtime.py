"""Captioning runtimes: what a Captioner, the evaluation loop and the search algorithms decode with.

A runtime turns images (or cached features) into an encoder output (`encode`) and that output into a Stepper
(`stepper`), the interface models.decoding's beam search, greedy search and sampling run over. Three kinds:

- TorchRuntime: an ExpansionNet in PyTorch (autocast precision, any device);
- OrtRuntime: an exported folder (deploy.onnx_export) run by ONNX Runtime, CPU or CUDA provider;
- EnsembleRuntime: several runtimes of one vocabulary; each member encodes with its own backbone (one pass per
  member per image) and keeps its own caches; the searches see the mean of the members' word probabilities.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import ExpansionNet, ModelConfig
from models.cpu_packing import prepare_for_cpu_decoding
from models.decoding import Compile, EnsembleStepper, Stepper, TorchStepper, compiled
from utils.checkpoint import state_dict_sha256
from utils.runtime import autocast, keep_freed_memory, resolve_precision

ONNX_FORMAT = "expansionnet-onnx"
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder_step.onnx"


@dataclass(frozen=True)
class Preprocessing:
    """How a runtime's backbone wants its images: side, mean and std (None for a features-only model)."""

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def preprocessing_of(config: ModelConfig) -> Preprocessing | None:
    bb = config.backbone
    return Preprocessing(bb.img_size, tuple(bb.mean), tuple(bb.std)) if bb is not None else None


class CaptionRuntime(ABC):
    """A captioning model seen from outside: encode inputs, make steppers, describe itself."""

    kind: str
    config: ModelConfig  # an ensemble's is its first member's
    device: torch.device
    precision: str

    max_seq_len = property(lambda self: self.config.max_seq_len, doc="the longest caption the model decodes")
    vocab_size = property(lambda self: self.config.vocab_size, doc="the number of the model's outputs")
    end_to_end = property(lambda self: self.config.backbone is not None, doc="whether it reads images (a backbone)")
    preprocessing = property(lambda self: preprocessing_of(self.config), doc="what the backbone wants (Preprocessing)")

    @abstractmethod
    def encode(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> Any:
        """Encoder output for preprocessed images (B, 3, H, W) or backbone features (B, N, C)."""

    @abstractmethod
    def stepper(self, memory: Any, key_mask: torch.Tensor | None, group: int, max_len: int) -> Stepper:
        """A Stepper over `encode`'s output for `group` hypotheses per image."""

    def teacher_forced_logprobs(self, tokens: torch.Tensor, memory: Any) -> torch.Tensor:
        """Log-probs (K, T, V) of inputs tokens (K, T) (SOS first), one image per row, one step at a time."""
        stepper = self.stepper(memory, None, 1, tokens.shape[1])
        tokens = tokens.to(stepper.device)
        return torch.stack([stepper.logprobs(tokens[:, :t + 1]) for t in range(tokens.shape[1])], dim=1)

    def info(self) -> dict[str, Any]:
        name = self.config.name if self.config is not None else None  # TorchRuntime may not know its config
        return {"kind": self.kind, "name": name, "device": str(self.device), "precision": self.precision}

    @abstractmethod
    def weights(self) -> dict[str, Any]:
        """{"parameters", "weights_sha256"}: which weights this runtime computes with (no file paths)."""


class TorchRuntime(CaptionRuntime):
    """An ExpansionNet in eval mode on one device, steps under one autocast precision.

    compile: torch.compile the encoder (backbone included) and the cached decoding step (True: inductor, or a
    backend name; see models.decoding.Compile). The step runs on fixed-size caches, so it compiles once per batch
    shape, not at every position; the first batches of a new shape pay the compilation (tens of seconds on a GPU).
    The constructor takes the model as it is (engine.evaluate wraps a model that goes on training);
    `for_captioning` prepares a loaded one.
    """

    kind = "torch"

    def __init__(self, model: ExpansionNet, config: ModelConfig | None, device: torch.device, precision: str,
                 compile: Compile = False) -> None:
        self.model = model
        self.config = config  # None when only the module is known (engine.evaluate's callers)
        self.device = device
        self.precision = precision
        self.compile = compile

    @classmethod
    def for_captioning(cls, model: ExpansionNet, config: ModelConfig, device: torch.device, precision: str = "auto",
                       compile: Compile = False) -> TorchRuntime:
        """The runtime of a model loaded to caption (deploy.loading builds its PyTorch runtimes with it): the model
        in eval mode on `device`, precision resolved ("auto"), and on the CPU its decoding step packed
        (models.cpu_packing.prepare_for_cpu_decoding) with glibc keeping freed memory (utils.runtime)."""
        model = model.eval().to(device)
        if device.type == "cpu":
            keep_freed_memory()
            prepare_for_cpu_decoding(model)
        return cls(model, config, device, resolve_precision(precision, device), compile=compile)

    # from the module, not the config: engine.evaluate's callers give none
    max_seq_len = property(lambda self: self.model.max_seq_len, doc=CaptionRuntime.max_seq_len.__doc__)
    vocab_size = property(lambda self: self.model.vocab_size, doc=CaptionRuntime.vocab_size.__doc__)
    end_to_end = property(lambda self: self.model.backbone is not None, doc=CaptionRuntime.end_to_end.__doc__)

    @property
    def preprocessing(self) -> Preprocessing | None:
        """What the backbone wants (Preprocessing): the config's; a features-only model wants none."""
        if self.config is None and self.end_to_end:
            raise ValueError("this TorchRuntime was made without its ModelConfig, so it does not know how its "
                             "backbone wants images; give TorchRuntime the config")
        return preprocessing_of(self.config) if self.config is not None else None

    def encode(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        encode = partial(compiled("encode", self.compile), self.model) if self.compile else self.model.encode
        with autocast(self.device, self.precision):
            return encode(images=images.to(self.device) if images is not None else None,
                          features=features.to(self.device) if features is not None else None)

    def stepper(self, memory: torch.Tensor, key_mask: torch.Tensor | None, group: int, max_len: int) -> Stepper:
        return TorchStepper(self.model, memory, key_mask, group, max_len, precision=self.precision,
                            compile=self.compile)

    def teacher_forced_logprobs(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            logits = self.model.decode(tokens.to(self.device), memory)
        return F.log_softmax(logits.float(), dim=-1)

    def info(self) -> dict[str, Any]:
        compile_info = self.compile if isinstance(self.compile, (bool, str)) else repr(self.compile)
        return {**super().info(), **({"compile": compile_info} if self.compile else {})}

    def weights(self) -> dict[str, Any]:
        return {"parameters": sum(p.numel() for p in self.model.parameters()),
                "weights_sha256": state_dict_sha256(self.model.state_dict())}


@dataclass
class OrtMemory:
    """The encoder graph's outputs: cross-attention keys/values of every decoder layer for `batch` images."""

    cross: dict[str, Any]
    batch: int


def onnx_providers(device: str | torch.device) -> list[str]:
    """ONNX Runtime execution providers for a device: CUDA (then CPU as fallback) or CPU; a clear error when the
    installed onnxruntime has no CUDA provider."""
    import onnxruntime as ort

    device = torch.device(device)
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("device cuda was asked for the ONNX backend, but this onnxruntime has no "
                             f"CUDAExecutionProvider (available: {ort.get_available_providers()}); install "
                             "onnxruntime-gpu, or use device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"the ONNX backend runs on cpu or cuda, not {device}")


def read_onnx_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    manifest = json.loads(path.read_text())
    if manifest.get("format") != ONNX_FORMAT:
        raise ValueError(f"{path} is not an exported ONNX folder (format {manifest.get('format')!r}, expected "
                         f"{ONNX_FORMAT!r})")
    return manifest


class OrtRuntime(CaptionRuntime):
    """An exported folder (encoder.onnx + decoder_step.onnx, config.json) run by ONNX Runtime.

    The decoder-step graph takes the past dynamic-expansion caches and the beam re-ordering index as inputs and
    returns the present caches, so the host only hands arrays from one step to the next.
    """

    kind = "onnx"

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        manifest = read_onnx_manifest(self.folder)
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest["model_config"])
        self.precision = manifest["precision"]
        self.float_dtype = np.float16 if self.precision == "fp16" else np.float32
        self.device = torch.device(device)
        self.providers = onnx_providers(self.device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: fp16 graphs on the CPU warn about every unfoldable constant
        opts.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
        self.encoder = ort.InferenceSession(str(self.folder / ENCODER_FILE), opts, providers=self.providers)
        self.decoder = ort.InferenceSession(str(self.folder / DECODER_FILE), opts, providers=self.providers)
        io = manifest["io"]
        self.encoder_input = io["encoder_input"]
        self.cross_names = io["cross"]
        self.past_names, self.present_names = io["past"], io["present"]
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"

    def _feed(self, array: np.ndarray) -> Any:
        if not self.on_cuda:
            return array
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device.index or 0)

    def encode(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> OrtMemory:
        x = images if self.encoder_input == "images" else features
        if x is None:
            raise ValueError(f"this exported model takes {self.encoder_input}, which were not given")
        array = np.ascontiguousarray(x.detach().cpu().numpy().astype(self.float_dtype, copy=False))
        if self.on_cuda:
            outs = self.encoder.run_with_ort_values(self.cross_names, {self.encoder_input: self._feed(array)})
        else:
            outs = self.encoder.run(self.cross_names, {self.encoder_input: array})
        return OrtMemory(dict(zip(self.cross_names, outs)), array.shape[0])

    def stepper(self, memory: OrtMemory, key_mask: torch.Tensor | None, group: int, max_len: int) -> Stepper:
        if key_mask is not None:
            raise ValueError("the exported decoder takes no key mask (images are never padded)")
        return OrtStepper(self, memory, group, max_len)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "providers": self.providers, "opset": self.manifest.get("opset")}

    def weights(self) -> dict[str, Any]:
        """The exported model's source weights, as the export recorded them."""
        return {key: self.manifest.get(key) for key in ("parameters", "weights_sha256")}


class OrtStepper(Stepper):
    """Decoder steps in ONNX Runtime: past caches and the pending beam re-ordering go in, present caches come out."""

    def __init__(self, runtime: OrtRuntime, memory: OrtMemory, group: int, max_len: int) -> None:
        if max_len > runtime.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {runtime.max_seq_len}")
        self.rt = runtime
        self.memory = memory
        self.batch, self.group, self.device = memory.batch, group, torch.device("cpu")
        self.max_len = max_len
        rows = memory.batch * group
        d = runtime.config.d_model
        empty = np.zeros((rows, 0, d), dtype=runtime.float_dtype)
        self.past = {name: runtime._feed(empty) for name in runtime.past_names}
        self.identity = np.arange(rows, dtype=np.int64)
        self.index = self.identity
        self.position = 0

    def logprobs(self, prefix: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        self._check_per_image(per_image)
        if self.position >= self.max_len:
            raise ValueError(f"decoder cache is full ({self.max_len} positions)")
        rt = self.rt
        feeds = {"tokens": rt._feed(np.ascontiguousarray(prefix[:, -1].cpu().numpy().astype(np.int64))),
                 "position": rt._feed(np.array([self.position], dtype=np.int64)),
                 "beam_index": rt._feed(self.index), **self.memory.cross, **self.past}
        names = ["logprobs", *rt.present_names]
        if rt.on_cuda:
            outs = rt.decoder.run_with_ort_values(names, feeds)
            logp = outs[0].numpy()
        else:
            outs = rt.decoder.run(names, feeds)
            logp = outs[0]
        self.past = dict(zip(rt.past_names, outs[1:]))
        self.index = self.identity
        self.position += 1
        return torch.from_numpy(logp)

    def reorder(self, index: torch.Tensor) -> None:
        self.index = np.ascontiguousarray(self.index[index.cpu().numpy()])


class EnsembleRuntime(CaptionRuntime):
    """Several runtimes sharing one vocabulary: word probabilities averaged at every step (EnsembleStepper)."""

    kind = "ensemble"

    def __init__(self, members: Sequence[CaptionRuntime]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.config = self.members[0].config
        self.device = self.members[0].device
        self.precision = "/".join(sorted({m.precision for m in self.members}))
        sizes = {m.vocab_size for m in self.members}
        if len(sizes) > 1:
            raise ValueError(f"ensemble members have different vocabulary sizes {sorted(sizes)}")
        if len({m.end_to_end for m in self.members}) > 1:
            raise ValueError("ensemble members mix end-to-end and features-only models")

    @property
    def max_seq_len(self) -> int:
        return min(m.max_seq_len for m in self.members)

    @property
    def preprocessings(self) -> list[Preprocessing | None]:
        return [m.preprocessing for m in self.members]

    def encode(self, images: torch.Tensor | Sequence[torch.Tensor] | None = None,
               features: torch.Tensor | Sequence[torch.Tensor] | None = None) -> list[Any]:
        """One encoder pass per member. images/features: one tensor for all members (they must then preprocess
        alike), or one per member (Captioner does this when their backbones want different images)."""
        def per_member(x):
            if x is None or isinstance(x, (list, tuple)):
                return x if x is not None else [None] * len(self.members)
            if images is not None and len(set(self.preprocessings)) > 1:
                raise ValueError("ensemble members preprocess images differently ("
                                 + ", ".join(f"{p.img_size} px" for p in self.preprocessings if p)
                                 + "): give one preprocessed batch per member")
            return [x] * len(self.members)

        imgs, feats = per_member(images), per_member(features)
        return [m.encode(images=i, features=f) for m, i, f in zip(self.members, imgs, feats)]

    def stepper(self, memory: list[Any], key_mask: torch.Tensor | None, group: int, max_len: int) -> Stepper:
        return EnsembleStepper([m.stepper(mem, key_mask, group, max_len) for m, mem in zip(self.members, memory)])

    def info(self) -> dict[str, Any]:
        return {**super().info(), "members": [m.info() for m in self.members]}

    def weights(self) -> dict[str, Any]:
        """Every member's parameters counted; one digest over the members' digests, in order."""
        parts = [m.weights() for m in self.members]
        digest = hashlib.sha256("".join(str(p["weights_sha256"]) for p in parts).encode()).hexdigest()
        return {"parameters": sum(p["parameters"] or 0 for p in parts), "weights_sha256": digest}

