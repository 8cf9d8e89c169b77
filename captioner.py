"""The Python API: caption images with a checkpoint, in a notebook, in demo.py or behind the HTTP API.

    from captioner import load_captioner
    captioner = load_captioner("phase6/best.pth", device="cpu")
    captioner.caption(["photo.jpg"], beam_size=5, max_len=20, num_captions=1)   # [[Caption(text, score, tokens)]]
    captioner.logprobs(["photo.jpg"], ["a cat on a sofa"])                       # (B, T, V) teacher-forced
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data.images import DEFAULT_MAX_PIXELS, BatchItem, to_image_batch
from data.vocab import Vocabulary
from engine.checkpoints import restore_model
from models import ExpansionNet, ModelConfig
from models.decoding import beam_search
from utils.runtime import autocast, resolve_device, resolve_precision


@dataclass(frozen=True)
class Caption:
    """One caption: text, ranking score (log-probability per token, SOS and EOS counted) and token ids."""

    text: str
    score: float
    tokens: tuple[int, ...]


class Captioner:
    """A model in eval mode with its vocabulary and preprocessing, on one device, at one precision."""

    def __init__(self, model: ExpansionNet, config: ModelConfig, vocab: Vocabulary, device: str | torch.device = "cpu",
                 precision: str = "auto", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.eval().to(self.device)
        self.config = config
        self.vocab = vocab
        self.max_pixels = max_pixels

    @property
    def end_to_end(self) -> bool:
        return self.config.backbone is not None

    def preprocess(self, images: Sequence[BatchItem]) -> torch.Tensor:
        """Paths, bytes, PIL images or preprocessed tensors -> (B, 3, H, W) normalised for this model's backbone."""
        if not self.end_to_end:
            raise ValueError("this checkpoint is a features-only model (no backbone): it cannot caption images; "
                             "use caption_features, or an end-to-end checkpoint")
        bb = self.config.backbone
        return to_image_batch(images, bb.img_size, bb.mean, bb.std, max_pixels=self.max_pixels)

    def _check_len(self, max_len: int) -> None:
        if not 1 <= max_len <= self.model.max_seq_len:
            raise ValueError(f"max_len must be between 1 and {self.model.max_seq_len} (the model's position "
                             f"embeddings), got {max_len}")

    @torch.inference_mode()
    def caption(self, images: Sequence[BatchItem], beam_size: int = 5, max_len: int = 20, num_captions: int = 1,
                batch_size: int = 16) -> list[list[Caption]]:
        """Beam-search captions for each image, best first: a list (per image) of num_captions Captions."""
        results: list[list[Caption]] = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start:start + batch_size]).to(self.device)
            with autocast(self.device, self.precision):
                memory = self.model.encode(images=pixels)
            results.extend(self._search(memory, beam_size, max_len, num_captions))
        return results

    @torch.inference_mode()
    def caption_features(self, features: torch.Tensor, beam_size: int = 5, max_len: int = 20,
                         num_captions: int = 1) -> list[list[Caption]]:
        """Captions from cached backbone features (B, N, C)."""
        with autocast(self.device, self.precision):
            memory = self.model.encode(features=features.to(self.device))
        return self._search(memory, beam_size, max_len, num_captions)

    def _search(self, memory: torch.Tensor, beam_size: int, max_len: int, num_captions: int) -> list[list[Caption]]:
        self._check_len(max_len)
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {beam_size}")
        v = self.vocab
        with autocast(self.device, self.precision):
            out = beam_search(self.model, memory, None, sos_idx=v.sos_idx, eos_idx=v.eos_idx, pad_idx=v.pad_idx,
                              beam_size=beam_size, max_len=max_len, num_outputs=num_captions)
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
        pixels = self.preprocess(images).to(self.device)
        with autocast(self.device, self.precision):
            logits = self.model(inputs.to(self.device), images=pixels)
        out = F.log_softmax(logits.float(), dim=-1)
        lengths = torch.tensor([len(e) - 1 for e in encoded], device=out.device)
        valid = torch.arange(T, device=out.device)[None, :] < lengths[:, None]
        return out * valid[..., None]


def load_captioner(path: str | Path, device: str | torch.device = "cpu", vocab: str | Path | None = None,
                   precision: str = "auto", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Captioner:
    """Load a checkpoint (ours, or the official one with vocab= its vocabulary pickle) for captioning."""
    restored = restore_model(path, vocab_path=vocab)
    return Captioner(restored.model, restored.config, restored.vocab, device=device, precision=precision,
                     max_pixels=max_pixels)
