"""What the routes share at run time: settings, the loaded model, the micro-batcher, decoding slots, URL fetcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from serving.backend import Backend, CaptionParams
from serving.batching import MicroBatcher, ModelThread, QueueFullError
from serving.imageguard import ImageLimits, check_uploads, decode_uploads
from serving.params import RawParams, RequestLimits, resolve_params
from serving.settings import ServingSettings
from serving.urlguard import UrlFetcher

logger = logging.getLogger("serving")

Captions = list[tuple[str, float]]


@dataclass
class ServingContext:
    """One app's run-time state; the model parts are set by the background load (``start_loading``, from the app's
    lifespan) and cleared by ``stop``."""

    settings: ServingSettings
    env_prefix: str = "CAPTION"
    url_fetcher: UrlFetcher | None = None
    repetition_controls: bool = True  # whether the model takes repetition_penalty and no_repeat_ngram_size
    backend: Backend | None = None
    batcher: MicroBatcher | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    decode_slots: asyncio.Semaphore | None = None  # bounds the full-resolution images in memory at once
    loading: asyncio.Task | None = None
    loader: ModelThread | None = None  # the thread the model loads in
    load_failed: str | None = None  # the exception's type name when the model could not be loaded

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits.from_settings(self.settings)

    @property
    def request_limits(self) -> RequestLimits:
        """What a request may ask for now: the settings' limits, and the model's once it is loaded."""
        model_max_len = self.backend.max_len if self.backend is not None else None
        return RequestLimits.of(self.settings, model_max_len, self.repetition_controls)

    @property
    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    def start_loading(self, load_backend: Callable[[], Backend]) -> None:
        """Load the model in the background: the port opens at once, /health answers, /ready is 503 until it is
        loaded (call from the running event loop)."""
        self.loading = asyncio.create_task(self._load(load_backend), name="model-load")

    async def _load(self, load_backend: Callable[[], Backend]) -> None:
        """Load the model (in a thread of its own: the loop keeps answering), describe it once, start the
        micro-batcher; a failure is logged with its traceback and makes /health and /ready answer 503."""
        try:
            if self.settings.threads:
                import torch

                torch.set_num_threads(self.settings.threads)
            # a daemon thread: a load that stop() gives up never holds the process's exit
            self.loader = ModelThread("model-load")
            try:
                backend = await self.loader.run(load_backend)
                self.model_info = await self.loader.run(backend.info)  # may hash the weights: once, off the loop
            finally:
                self.loader.stop()
            batcher = MicroBatcher(backend.caption_batch, self.settings.max_batch_size, self.settings.max_wait_ms,
                                   self.settings.queue_size)
            await batcher.start()
        except Exception as exc:
            self.load_failed = type(exc).__name__
            logger.error("the model failed to load: %s", exc, exc_info=exc)
            return
        self.decode_slots = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        self.backend, self.batcher = backend, batcher
        logger.info("model loaded: %s", self.model_info)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new work, fail what waits, let the model thread go (without waiting for a stuck call); a load still
        running is given up after grace_s (as a batch is: batching.MicroBatcher.stop)."""
        loading, self.loading = self.loading, None
        if loading is not None and not loading.done():
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            if self.loader is not None and not await asyncio.to_thread(self.loader.join, grace_s):
                logger.warning("the model is still loading after %g s; leaving its thread behind", grace_s)
        self.backend = None
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            await batcher.stop()

    def not_ready(self) -> HTTPException:
        """503 with Retry-After saying why there is no model: loading, failed, or not started."""
        if self.load_failed is not None:
            return HTTPException(503, f"the model failed to load ({self.load_failed}; the server log says why): "
                                      "fix the settings and restart the server", headers=self.retry_after)
        if self.loading is not None:
            return HTTPException(503, "the model is loading, retry later", headers=self.retry_after)
        return HTTPException(503, "the model is not loaded yet", headers=self.retry_after)

    def ready_backend(self) -> Backend:
        """The loaded model, or 503 with Retry-After."""
        if self.backend is None:
            raise self.not_ready()
        return self.backend

    async def loaded_backend(self) -> Backend:
        """The loaded model; a request that arrives while it loads waits for it, up to a request's deadline
        (model_timeout_s), then gets 503 with Retry-After."""
        loading = self.loading
        if self.backend is None and loading is not None and not loading.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(loading), self.settings.model_timeout_s)
        return self.ready_backend()

    async def params(self, raw: RawParams) -> CaptionParams:
        """The client's decoding parameters with defaults filled in and every bound checked (422)."""
        backend = await self.loaded_backend()
        return resolve_params(raw, self.settings, backend, self.request_limits)

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
            raise self.not_ready()
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
