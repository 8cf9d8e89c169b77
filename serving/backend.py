"""What an app needs from a model: the Backend protocol and the decoding parameters requests are grouped by."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from utils.checkpoint import state_dict_sha256


@dataclass(frozen=True)
class CaptionParams:
    """Decoding parameters of one request; hashable, so a batch is split into groups of equal parameters."""

    beam_size: int = 5
    max_len: int = 20
    num_captions: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


@runtime_checkable
class Backend(Protocol):
    """A loaded captioning model; ``caption_batch`` runs in the single model thread, never concurrently.

    A backend may also define ``prepare(image) -> item``: it runs in a request's decode thread before queueing (resize
    and normalise, e.g. to a small tensor), so that queued requests hold model-sized inputs instead of full-resolution
    images and the model thread only runs the model; ``caption_batch`` then receives those items.
    """

    max_len: int  # longest caption the model can produce, in tokens

    def info(self) -> dict[str, Any]:
        """JSON-able description for /ready: name, kind, parameter count, weights hash, device... never a file path
        (called once, at start-up, in a worker thread)."""
        ...

    def check_params(self, params: CaptionParams) -> None:
        """Raise ValueError (answered 422) for parameters this model does not support."""
        ...

    def caption_batch(self, images: Sequence[Image.Image], params: CaptionParams) -> list[list[tuple[str, float]]]:
        """For each RGB image (or prepared item), ``params.num_captions`` (text, score) pairs, best first."""
        ...


def weights_summary(module: Any) -> dict[str, Any]:
    """Parameter count and the SHA-256 of a torch module's weights (utils.checkpoint.state_dict_sha256, the digest
    checkpoints and feature files record): which weights are served, without saying where they came from."""
    return {"parameters": sum(p.numel() for p in module.parameters()),
            "weights_sha256": state_dict_sha256(module.state_dict())}
