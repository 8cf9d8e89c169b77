"""What the routes share at run time: settings, the loaded model, the micro-batcher, decoding slots, URL fetcher."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from serving.backend import Backend, CaptionParams
from serving.batching import MicroBatcher, QueueFullError
from serving.imageguard import ImageLimits, check_uploads, decode_uploads
from serving.params import RawParams, resolve_params
from serving.settings import ServingSettings
from serving.urlguard import UrlFetcher

logger = logging.getLogger("serving")

Captions = list[tuple[str, float]]


@dataclass
class ServingContext:
    """One app's run-time state; the model parts are set by ``start`` (the app's lifespan) and cleared by ``stop``."""

    settings: ServingSettings
    env_prefix: str = "CAPTION"
    url_fetcher: UrlFetcher | None = None
    backend: Backend | None = None
    batcher: MicroBatcher | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    decode_slots: asyncio.Semaphore | None = None  # bounds the full-resolution images in memory at once

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits.from_settings(self.settings)

    @property
    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    async def start(self, load_backend: Callable[[], Backend]) -> None:
        """Load the model (in a thread: the loop keeps answering), describe it once, start the micro-batcher."""
        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)
        backend = await asyncio.to_thread(load_backend)
        self.model_info = await asyncio.to_thread(backend.info)  # may hash the weights: once, off the loop
        batcher = MicroBatcher(backend.caption_batch, self.settings.max_batch_size, self.settings.max_wait_ms,
                               self.settings.queue_size)
        await batcher.start()
        self.decode_slots = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        self.backend, self.batcher = backend, batcher
        logger.info("model loaded: %s", self.model_info)

    async def stop(self) -> None:
        """Refuse new work, fail what waits, let the model thread go (without waiting for a stuck call)."""
        self.backend = None
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            await batcher.stop()

    def ready_backend(self) -> Backend:
        """The loaded model, or 503 with Retry-After while it loads."""
        if self.backend is None:
            raise HTTPException(503, "the model is not loaded yet", headers=self.retry_after)
        return self.backend

    def params(self, raw: RawParams) -> CaptionParams:
        """The client's decoding parameters with defaults filled in and every bound checked (422)."""
        return resolve_params(raw, self.settings, self.ready_backend())

    def model_stuck_seconds(self) -> float | None:
        """How long the model thread has been on one batch, when that is longer than a request's deadline."""
        busy = self.batcher.busy_seconds() if self.batcher is not None else 0.0
        return busy if busy > self.settings.model_timeout_s else None

    async def decode(self, blobs: list[tuple[bytes, str]],
                     prepare: Callable[[Image.Image], Any] | None = None) -> list[Any]:
        """Check every upload's format and size from its header (415 / 422), then decode and prepare them in a worker
        thread, a bounded number of requests at a time, before they may enter the queue."""
        backend, slots = self.ready_backend(), self.decode_slots
        assert slots is not None
        formats = check_uploads(blobs, self.limits)
        prepare = prepare or getattr(backend, "prepare", None)
        async with slots:
            return await run_in_threadpool(decode_uploads, blobs, formats, self.limits, prepare)

    async def caption(self, images: list[Any], params: CaptionParams) -> list[Captions]:
        """Through the micro-batcher within the request's deadline: 503 when the queue is full, 504 when the model
        has not answered in time; a model failure is a JSON 500 for this request only."""
        batcher, timeout = self.batcher, self.settings.model_timeout_s
        if batcher is None:
            raise HTTPException(503, "the model is not loaded yet", headers=self.retry_after)
        try:
            return await asyncio.wait_for(batcher.submit(images, params), timeout)
        except QueueFullError:
            raise HTTPException(503, "server busy: the caption queue is full, retry later",
                                headers=self.retry_after) from None
        except asyncio.TimeoutError:
            raise HTTPException(504, f"the model did not answer within {timeout:g} s "
                                     f"({self.env_prefix}_MODEL_TIMEOUT_S): the server is overloaded or its model is "
                                     "stuck (see /health); retry later", headers=self.retry_after) from None
        except HTTPException:
            raise
        except Exception as exc:
            if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
                raise HTTPException(503, "server out of memory for this batch, retry later",
                                    headers=self.retry_after) from None
            raise HTTPException(500, f"captioning failed: internal model error ({type(exc).__name__})") from None


def serving_context(request: Request) -> ServingContext:
    """The app's ServingContext (a route dependency)."""
    return request.app.state.serving  # type: ignore[no-any-return]
