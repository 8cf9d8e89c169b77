"""What an app needs from a model: the Backend protocol and the decoding parameters requests are grouped by."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image


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
        """JSON-able description for /ready (model name, device, precision...)."""
        ...

    def check_params(self, params: CaptionParams) -> None:
        """Raise ValueError (answered 422) for parameters this model does not support."""
        ...

    def caption_batch(self, images: Sequence[Image.Image], params: CaptionParams) -> list[list[tuple[str, float]]]:
        """For each RGB image (or prepared item), ``params.num_captions`` (text, score) pairs, best first."""
        ...
