"""The Python API: caption images with a checkpoint, in a notebook, in demo.py or behind the HTTP API.

    from captioner import load_captioner
    captioner = load_captioner("phase6/best.pth")  # the scripts' defaults: device auto, backend auto, precision auto
    captioner.caption("photo.jpg")                       # [Caption(text, score, tokens)]: one image, its captions
    captioner.caption(["a.jpg", pil_image, jpeg_bytes], beam_size=5, num_captions=3)  # one list per image
    captioner.logprobs(["photo.jpg"], ["a cat on a sofa"])                       # (B, T, V) teacher-forced
    load_captioner("model_dir/")                         # a model folder (save_pretrained) or an ONNX export
    load_captioner(["a.pth", "b.pth"])                   # an ensemble (one vocabulary)
    load_captioner("a.pth", backend="onnx")              # ONNX Runtime (exported once into a cache folder first)
    load_captioner("a.pth", device="cuda", compile=True)  # torch.compile'd encoder and decoding step (PyTorch)
    captioner.save_pretrained("model_dir/")              # config.json, vocab.json, model.safetensors, README.md
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data.images import DEFAULT_MAX_PIXELS, BatchItem, open_image, to_image_batch
from data.vocab import Vocabulary
from deploy.checkpoints import require_end_to_end
from deploy.folder import card_facts, save_pretrained
from deploy.loading import DEFAULT_BACKEND, load_model, training_facts
from deploy.runtime import CaptionRuntime, TorchRuntime
from models import ExpansionNet, ModelConfig
from models.decoding import Compile, SearchOutput, beam_search, greedy_search, sample
from utils.cli import CheckpointOptions
from utils.runtime import RuntimeOptions, resolve_device


@dataclass(frozen=True)
class Caption:
    """One caption: text, ranking score (log-probability per token, SOS and EOS counted) and token ids."""

    text: str
    score: float
    tokens: tuple[int, ...]


SEARCH_METHODS = ("beam", "greedy", "sample")


class Captioner:
    """A captioning runtime (PyTorch, ONNX Runtime or an ensemble) with its vocabulary and preprocessing.

    Captioner(model, config, vocab, device, precision) wraps a PyTorch ExpansionNet; Captioner.from_runtime wraps
    any deploy.runtime.CaptionRuntime. caption / caption_features / logprobs work the same for every kind.
    """

    def __init__(self, model: ExpansionNet, config: ModelConfig, vocab: Vocabulary,
                 device: str | torch.device = RuntimeOptions.device, precision: str = RuntimeOptions.precision,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, compile: Compile = CheckpointOptions.compile) -> None:
        dev = resolve_device(device)
        runtime = TorchRuntime.for_captioning(model, config, dev, precision, compile=compile)
        self._setup(runtime, vocab, max_pixels)

    @classmethod
    def from_runtime(cls, runtime: CaptionRuntime, vocab: Vocabulary,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Captioner:
        if runtime.vocab_size != len(vocab):
            raise ValueError(f"the model has {runtime.vocab_size} outputs but the vocabulary {len(vocab)} tokens")
        self = cls.__new__(cls)
        self._setup(runtime, vocab, max_pixels)
        return self

    def _setup(self, runtime: CaptionRuntime, vocab: Vocabulary, max_pixels: int | None) -> None:
        self.runtime = runtime
        self.vocab = vocab
        self.max_pixels = max_pixels
        self.sources: list[Path] = []
        self.training: dict[str, Any] = {}  # what the source checkpoint records (phase, train_config, ...)

    @property
    def model(self) -> ExpansionNet:
        """The PyTorch model (backend torch, single model only)."""
        if not isinstance(self.runtime, TorchRuntime):
            raise AttributeError(f"a {self.runtime.kind} captioner has no single PyTorch model; use max_seq_len, "
                                 "config or runtime")
        return self.runtime.model

    config = property(lambda self: self.runtime.config, doc="the ModelConfig (an ensemble's: its first member's)")
    device = property(lambda self: self.runtime.device, doc="the torch.device decoding runs on")
    precision = property(lambda self: self.runtime.precision, doc="the autocast precision (fp32, bf16 or fp16)")
    backend = property(lambda self: self.runtime.kind, doc="torch, onnx or ensemble")
    max_seq_len = property(lambda self: self.runtime.max_seq_len, doc="the model's positions, SOS included")
    max_caption_len = property(lambda self: self.runtime.max_seq_len - 1,
                               doc="the default length cap: the model's full length, as demo.py and test.py decode")
    end_to_end = property(lambda self: self.runtime.end_to_end, doc="whether the model reads images (has a backbone)")

    def preprocess(self, images: Sequence[BatchItem]) -> torch.Tensor:
        """Paths, bytes, PIL images or preprocessed tensors -> (B, 3, H, W) normalised for this model's backbone
        (an ensemble's first member's; see pixels for members that want other sizes)."""
        require_end_to_end(self.config, self.sources[0] if self.sources else "this model")
        pre = self.runtime.preprocessing
        return to_image_batch(images, pre.img_size, pre.mean, pre.std, max_pixels=self.max_pixels)

    def pixels(self, images: Sequence[BatchItem]) -> torch.Tensor | list[torch.Tensor]:
        """The encoder input: one batch, or for an ensemble whose members preprocess differently one per member
        (each image is opened once)."""
        pres = getattr(self.runtime, "preprocessings", None)
        if not pres or len(set(pres)) == 1:
            return self.preprocess(images)
        if not self.end_to_end:
            raise ValueError("this ensemble works on cached features: it cannot caption images")
        opened = [im if isinstance(im, torch.Tensor) else open_image(im, max_pixels=self.max_pixels)
                  for im in images]
        if any(isinstance(im, torch.Tensor) for im in opened):
            raise ValueError("ensemble members preprocess images differently, so give images (paths, bytes, PIL), "
                             "not preprocessed tensors")
        batches = {p: to_image_batch(opened, p.img_size, p.mean, p.std, max_pixels=None) for p in set(pres)}
        return [batches[p] for p in pres]

    def _check_len(self, max_len: int) -> None:
        if not 1 <= max_len <= self.max_seq_len:
            raise ValueError(f"max_len must be between 1 and {self.max_seq_len} (the model's position "
                             f"embeddings), got {max_len}")

    @torch.inference_mode()
    def caption(self, images: BatchItem | Sequence[BatchItem], beam_size: int = 5, max_len: int | None = None,
                num_captions: int = 1, batch_size: int = 16, method: str = "beam",
                generator: torch.Generator | None = None) -> list[Caption] | list[list[Caption]]:
        """Captions of one image or of each image of a list, best first.

        images: one image (a path as str or Path, bytes, a PIL image, a preprocessed (3, H, W) tensor), which gives
        its list of num_captions Captions, as Hugging Face image-to-text pipelines do; or a list (tuple) of images, or
        a (B, 3, H, W) tensor, which give one such list per image. max_len: None is the model's full length
        (max_caption_len), the cap demo.py and test.py use. method: beam (beam search of beam_size), greedy
        (num_captions 1) or sample (num_captions captions drawn with temperature 1 from `generator`, ranked by score).
        """
        single = is_single_image(images)
        batch = [images] if single else list(images)
        results: list[list[Caption]] = []
        for start in range(0, len(batch), batch_size):
            memory = self.runtime.encode(images=self.pixels(batch[start:start + batch_size]))
            results.extend(self._search(memory, beam_size, max_len, num_captions, method, generator))
        return results[0] if single else results

    @torch.inference_mode()
    def caption_features(self, features: torch.Tensor, beam_size: int = 5, max_len: int | None = None,
                         num_captions: int = 1, method: str = "beam", generator: torch.Generator | None = None
                         ) -> list[list[Caption]]:
        """Captions from cached backbone features (B, N, C) (see caption for the arguments)."""
        memory = self.runtime.encode(features=features)
        return self._search(memory, beam_size, max_len, num_captions, method, generator)

    def _search(self, memory: Any, beam_size: int, max_len: int | None, num_captions: int, method: str,
                generator: torch.Generator | None) -> list[list[Caption]]:
        max_len = self.max_caption_len if max_len is None else max_len
        self._check_len(max_len)
        v = self.vocab
        ids = {"sos_idx": v.sos_idx, "eos_idx": v.eos_idx, "pad_idx": v.pad_idx}
        if method == "beam":
            if beam_size < 1:
                raise ValueError(f"beam_size must be at least 1, got {beam_size}")
            out = beam_search(self.runtime, memory, None, beam_size=beam_size, max_len=max_len,
                              num_outputs=num_captions, **ids)
        elif method == "greedy":
            if num_captions != 1:
                raise ValueError(f"greedy search gives one caption per image, not {num_captions}")
            out = greedy_search(self.runtime, memory, None, max_len=max_len, **ids)
        elif method == "sample":
            drawn = sample(self.runtime, memory, None, num_samples=num_captions, max_len=max_len,
                           generator=generator, **ids)
            scores = drawn.scores / (drawn.lengths + 1).float()  # ranked like beam search
            order = scores.argsort(dim=-1, descending=True)
            pick = order[..., None].expand(-1, -1, drawn.tokens.shape[-1])
            out = SearchOutput(drawn.tokens.gather(1, pick), drawn.logprobs.gather(1, pick), scores.gather(1, order),
                               drawn.lengths.gather(1, order))
        else:
            raise ValueError(f"method must be one of {SEARCH_METHODS}, got {method!r}")
        tokens, scores, lengths = out.tokens.cpu().tolist(), out.scores.float().cpu().tolist(), out.lengths.tolist()
        return [[Caption(v.decode(t[:n]), s, tuple(t[:n])) for t, s, n in zip(ts, ss, ns)]
                for ts, ss, ns in zip(tokens, scores, lengths)]

    @torch.inference_mode()
    def logprobs(self, images: Sequence[BatchItem], captions: Sequence[str]) -> torch.Tensor:
        """Teacher-forced log-probabilities (B, T, V): position t predicts token t+1 of SOS caption EOS.

        T is the longest encoded caption (with EOS); rows of shorter captions are padded with zeros.
        """
        if len(images) != len(captions):
            raise ValueError(f"logprobs needs one caption per image: {len(images)} images, {len(captions)} captions")
        encoded = [self.vocab.encode(c) for c in captions]
        T = max(len(e) for e in encoded) - 1
        self._check_len(T)
        inputs = torch.full((len(encoded), T), self.vocab.pad_idx, dtype=torch.long)
        for i, e in enumerate(encoded):
            inputs[i, :len(e) - 1] = torch.tensor(e[:-1])
        memory = self.runtime.encode(images=self.pixels(images))
        out = self.runtime.teacher_forced_logprobs(inputs, memory)
        lengths = torch.tensor([len(e) - 1 for e in encoded], device=out.device)
        valid = torch.arange(T, device=out.device)[None, :] < lengths[:, None]
        return out * valid[..., None]

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a shareable model folder (config.json, vocab.json, model.safetensors, README.md); load it again
        with load_captioner(folder). Only a single PyTorch model can be saved (export.py writes ONNX folders)."""
        if not isinstance(self.runtime, TorchRuntime):
            raise ValueError(f"save_pretrained needs a single PyTorch model; this captioner runs on {self.backend} "
                             "(load it with load_captioner(path, backend='torch'); save ensemble members one by one; "
                             "an ONNX folder is already shareable)")
        return save_pretrained(folder, self.model, self.config, self.vocab,
                               source=str(self.sources[0]) if self.sources else "",
                               card_extra=card_facts(self.training), training=self.training)


def is_single_image(images: Any) -> bool:
    """Whether ``images`` is one image (a path, bytes, a PIL image or a (3, H, W) tensor) rather than a list of them or
    a (B, 3, H, W) batch tensor: a str is a path, never a sequence of characters."""
    if isinstance(images, torch.Tensor):
        return images.dim() == 3
    return isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image))


def load_captioner(path: str | Path | Sequence[str | Path], device: str | torch.device = RuntimeOptions.device,
                   vocab: str | Path | None = None, precision: str = RuntimeOptions.precision,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, backend: str = DEFAULT_BACKEND,
                   threads: int | None = None, onnx_cache: str | Path | None = None,
                   compile: Compile = CheckpointOptions.compile) -> Captioner:
    """Load a captioner from a training checkpoint, an official checkpoint (vocab= its vocabulary pickle), a model
    folder (save_pretrained), an exported ONNX folder (export.py), or a list of any of those: an ensemble averaging
    the members' word probabilities (one vocabulary; backbones may differ).

    The defaults are the scripts' (demo.py, test.py, the HTTP API), read from their option fields: device auto (a GPU
    when there is one), backend auto, precision auto (bf16 on a GPU that supports it, fp32 on the CPU), no compile.
    backend: auto (ONNX Runtime for an exported ONNX folder, PyTorch for everything else: no export is started on
    its own), torch, or onnx. ONNX Runtime on a PyTorch source exports it once (minutes, about 3x PyTorch's peak
    memory) into onnx_cache/<weights digest>-<precision>/ (default: deploy.loading.default_onnx_cache(), which keeps
    the deploy.loading.ONNX_CACHE_KEEP most recently used exports). threads: ONNX Runtime's intra-op threads.
    compile: torch.compile the PyTorch encoder and decoding step (True, or a torch.compile backend name; see
    deploy.runtime.TorchRuntime). Worth it on a GPU for many batches of one size.
    """
    loaded = load_model(path if isinstance(path, (str, Path)) else list(path), backend=backend, device=device,
                        precision=precision, vocab=vocab, threads=threads, onnx_cache=onnx_cache, compile=compile)
    captioner = Captioner.from_runtime(loaded.runtime, loaded.vocab, max_pixels=max_pixels)
    captioner.sources = loaded.sources
    captioner.training = training_facts(loaded.checkpoint)
    return captioner
