"""The FastAPI app factory shared by api.py and the BLIP API: endpoints, validation, errors and the web page."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.backend import Backend, CaptionParams
from serving.batching import MicroBatcher, QueueFullError
from serving.settings import ServingSettings
from serving.uploads import decode_base64_image, decode_images, media_type, parse_multipart, read_body
from serving.urlguard import UrlFetcher, UrlFetchError

logger = logging.getLogger("serving")
STATIC_DIR = Path(__file__).resolve().parent / "static"
_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
             "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class CaptionOut(BaseModel):
    caption: str
    score: float | None = Field(description="mean log-probability per token (higher is better)")


class PredictOut(BaseModel):
    caption: str = Field(description="the best caption")
    score: float | None
    captions: list[CaptionOut] = Field(description="num_captions captions, best first")


class PredictsItem(PredictOut):
    filename: str | None = Field(description="the client's file name, echoed as a label (never used as a path)")


class CaptionedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    imageUrl: str = Field(description="http(s) URL of an image on an allowlisted host")
    imageName: str | None = None


class CaptionedOut(PredictOut):
    imageName: str | None
    imageUrl: str


class HFParameters(BaseModel):
    """Hugging Face generation parameter names."""

    model_config = ConfigDict(extra="forbid")
    num_beams: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    num_return_sequences: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)


class HFRequest(BaseModel):
    """The Hugging Face image-to-text request: a base64 image (or data URL) and optional parameters."""

    model_config = ConfigDict(extra="forbid")
    inputs: str = Field(description="base64-encoded image bytes, or a data:image/...;base64 URL")
    parameters: HFParameters | None = None


class GeneratedText(BaseModel):
    generated_text: str
    score: float | None


@dataclass
class RawParams:
    """Decoding parameters as the client gave them (None: server default)."""

    beam_size: int | None = None
    max_len: int | None = None
    num_captions: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None

    def merged(self, other: RawParams) -> RawParams:
        """These values, overridden by the ones set in other."""
        return RawParams(*(b if b is not None else a for a, b in zip(vars(self).values(), vars(other).values())))


@dataclass
class _State:
    backend: Backend | None = None
    batcher: MicroBatcher | None = None
    decode_slots: asyncio.Semaphore | None = None  # bounds the full-resolution images in memory at once


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its $defs inlined, usable as an OpenAPI request body schema."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


def _multipart_body(field: str, many: bool) -> dict[str, Any]:
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": file_schema} if many else file_schema
    schema = {"type": "object", "properties": {field: prop}, "required": [field]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@cache
def _page(name: str) -> str:
    return (STATIC_DIR / name).read_text(encoding="utf-8")


def _score(value: float) -> float | None:
    """JSON has no NaN or infinity."""
    return float(value) if math.isfinite(value) else None


def _captions_json(captions: list[tuple[str, float]]) -> dict[str, Any]:
    listed = [{"caption": text, "score": _score(score)} for text, score in captions]
    return {"caption": listed[0]["caption"], "score": listed[0]["score"], "captions": listed}


def create_app(load_backend: Callable[[], Backend], settings: ServingSettings, *, title: str,
               description: str = "", env_prefix: str = "CAPTION", url_fetcher: UrlFetcher | None = None) -> FastAPI:
    """Build the app; ``load_backend`` runs once at start-up (lifespan), never at import.

    URL fetching for /captioned is on when ``settings.url_fetch`` is true (or a ``url_fetcher`` is given).
    """
    state = _State()
    retry = {"Retry-After": str(settings.retry_after_s)}
    if url_fetcher is None and settings.url_fetch:
        url_fetcher = UrlFetcher(settings.url_allowlist, settings.max_body_bytes, settings.url_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        backend = await asyncio.to_thread(load_backend)
        batcher = MicroBatcher(backend.caption_batch, settings.max_batch_size, settings.max_wait_ms,
                               settings.queue_size)
        await batcher.start()
        state.decode_slots = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        state.backend, state.batcher = backend, batcher
        logger.info("model loaded: %s", backend.info())
        try:
            yield
        finally:
            state.backend = None
            await batcher.stop()
            state.batcher = None

    app = FastAPI(title=title, description=description, lifespan=lifespan)  # body limits: uploads.read_body (JSON 413)
    app.state.serving = state
    app.state.settings = settings

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error: %r", exc, exc_info=exc)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    def ready_backend() -> Backend:
        if state.backend is None:
            raise HTTPException(503, "the model is not loaded yet", headers=retry)
        return state.backend

    def only_query(*names: str) -> Callable[[Request], None]:
        allowed = frozenset(names)

        def check(request: Request) -> None:
            unknown = sorted(set(request.query_params) - allowed)
            if unknown:
                raise HTTPException(422, f"unknown query parameters {unknown}; accepted: {sorted(allowed)}")

        return check

    ours = ("beam_size", "max_len", "num_captions", "repetition_penalty", "no_repeat_ngram_size")
    hf = ("num_beams", "max_new_tokens", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size")

    def query_params(
        beam_size: int | None = Query(None, ge=1, le=settings.max_beam_size, description="beam width"),
        max_len: int | None = Query(None, ge=1, le=settings.max_len_limit, description="maximum caption tokens"),
        num_captions: int | None = Query(None, ge=1, le=settings.max_beam_size, description="captions per image"),
        repetition_penalty: float | None = Query(None, ge=1.0, le=10.0, description="(BLIP) >1 discourages repeats"),
        no_repeat_ngram_size: int | None = Query(None, ge=0, le=10, description="(BLIP) forbid repeated n-grams"),
        _: None = Depends(only_query(*ours)),
    ) -> RawParams:
        return RawParams(beam_size, max_len, num_captions, repetition_penalty, no_repeat_ngram_size)

    def hf_query_params(
        num_beams: int | None = Query(None, ge=1, le=settings.max_beam_size),
        max_new_tokens: int | None = Query(None, ge=1, le=settings.max_len_limit),
        num_return_sequences: int | None = Query(None, ge=1, le=settings.max_beam_size),
        repetition_penalty: float | None = Query(None, ge=1.0, le=10.0),
        no_repeat_ngram_size: int | None = Query(None, ge=0, le=10),
        _: None = Depends(only_query(*hf)),
    ) -> RawParams:
        return RawParams(num_beams, max_new_tokens, num_return_sequences, repetition_penalty, no_repeat_ngram_size)

    def resolve(raw: RawParams) -> CaptionParams:
        """Defaults filled in and every bound checked (422), including the model's own limits."""
        backend = ready_backend()
        beam = raw.beam_size if raw.beam_size is not None else max(settings.beam_size, raw.num_captions or 1)
        num = raw.num_captions if raw.num_captions is not None else settings.num_captions
        len_limit = min(settings.max_len_limit, backend.max_len)
        max_len = raw.max_len if raw.max_len is not None else min(settings.max_len, len_limit)
        problems = []
        if not 1 <= beam <= settings.max_beam_size:
            problems.append(f"beam size must be between 1 and {settings.max_beam_size}, got {beam}")
        if not 1 <= num <= beam:
            problems.append(f"number of captions must be between 1 and the beam size ({beam}), got {num}")
        if not 1 <= max_len <= len_limit:
            problems.append(f"maximum length must be between 1 and {len_limit}, got {max_len}")
        penalty = 1.0 if raw.repetition_penalty is None else raw.repetition_penalty
        if not 1.0 <= penalty <= 10.0:
            problems.append(f"repetition_penalty must be between 1 and 10, got {penalty}")
        ngram = 0 if raw.no_repeat_ngram_size is None else raw.no_repeat_ngram_size
        if not 0 <= ngram <= 10:
            problems.append(f"no_repeat_ngram_size must be between 0 and 10, got {ngram}")
        if problems:
            raise HTTPException(422, "; ".join(problems))
        params = CaptionParams(beam, max_len, num, penalty, ngram)
        try:
            backend.check_params(params)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return params

    async def decode(blobs: list[tuple[bytes, str]]) -> list[Any]:
        """Decode and prepare uploads (a bounded number at a time) before they may enter the queue."""
        backend, slots = ready_backend(), state.decode_slots
        assert slots is not None
        async with slots:
            return await decode_images(blobs, settings.max_pixels, getattr(backend, "prepare", None))

    async def caption(images: list[Any], params: CaptionParams) -> list[list[tuple[str, float]]]:
        """Through the micro-batcher; a full queue is 503, a model failure a JSON 500 for this request only."""
        batcher = state.batcher
        if batcher is None:
            raise HTTPException(503, "the model is not loaded yet", headers=retry)
        try:
            return await batcher.submit(images, params)
        except QueueFullError:
            raise HTTPException(503, "server busy: the caption queue is full, retry later", headers=retry) from None
        except HTTPException:
            raise
        except Exception as exc:
            if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
                raise HTTPException(503, "server out of memory for this batch, retry later", headers=retry) from None
            raise HTTPException(500, f"captioning failed: internal model error ({type(exc).__name__})") from None

    async def read_json(request: Request, model: type[BaseModel]) -> Any:
        if media_type(request) != "application/json":
            raise HTTPException(415, f"expected a JSON body (Content-Type: application/json), got "
                                     f"{media_type(request) or 'no Content-Type'}")
        body = await read_body(request, settings.max_body_bytes)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, jsonable_encoder(exc.errors(include_url=False, include_context=False))) from None

    async def read_files(request: Request, field: str, max_files: int) -> list[tuple[bytes, str]]:
        """(bytes, label) of the files of a multipart body's ``field``; anything else in the form is a 422."""
        kind = media_type(request)
        if kind != "multipart/form-data":
            raise HTTPException(415, f"expected multipart/form-data with the image(s) in field {field!r}, got "
                                     f"{kind or 'no Content-Type'}")
        body = await read_body(request, settings.max_body_bytes)
        files, fields = parse_multipart(body, request.headers["content-type"], frozenset({field}), max_files + 8)
        others = sorted({f.field for f in files if f.field != field} | set(fields))
        if others:
            raise HTTPException(422, f"unknown form fields {others}: send the image(s) in field {field!r} and "
                                     "decoding parameters as query parameters")
        if not files:
            raise HTTPException(422, f"no file in form field {field!r}")
        if len(files) > max_files:
            raise HTTPException(422, f"too many files: {len(files)} (at most {max_files} per request)")
        return [(f.data, f.filename or field) for f in files]

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        headers = {"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff"}
        return HTMLResponse(_page("index.html"), headers=headers)

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 503 until the model is loaded, then its description",
             responses={503: {"description": "model not loaded yet"}})
    async def ready() -> dict[str, Any]:
        backend = ready_backend()
        limits = {key: getattr(settings, key) for key in ("max_body_bytes", "max_pixels", "max_files",
                                                           "max_batch_size", "queue_size", "max_beam_size")}
        limits["max_len_limit"] = min(settings.max_len_limit, backend.max_len)
        return {"status": "ready", "model": backend.info(), "limits": limits,
                "defaults": {"beam_size": settings.beam_size, "max_len": min(settings.max_len, backend.max_len),
                             "num_captions": settings.num_captions},
                "url_fetch": url_fetcher is not None}

    errors = {413: {"description": "body too large"}, 415: {"description": "wrong content type"},
              422: {"description": "not an image, corrupt, too many pixels, or bad parameters"},
              503: {"description": "queue full or model not loaded (Retry-After)"}}

    @app.post("/predict", response_model=PredictOut, openapi_extra=_multipart_body("file", many=False),
              summary="Caption one uploaded image (multipart field 'file')", responses=errors)
    async def predict(request: Request, raw: RawParams = Depends(query_params)) -> dict[str, Any]:
        params = resolve(raw)
        blobs = await read_files(request, "file", max_files=1)
        images = await decode(blobs)
        return _captions_json((await caption(images, params))[0])

    @app.post("/predicts", response_model=list[PredictsItem], openapi_extra=_multipart_body("files", many=True),
              summary="Caption several uploaded images (multipart field 'files', repeated)", responses=errors)
    async def predicts(request: Request, raw: RawParams = Depends(query_params)) -> list[dict[str, Any]]:
        params = resolve(raw)
        blobs = await read_files(request, "files", max_files=settings.max_files)
        images = await decode(blobs)
        results = await caption(images, params)
        return [{"filename": name, **_captions_json(caps)} for (_, name), caps in zip(blobs, results)]

    captioned_body = {"requestBody": {"required": True,
                                      "content": {"application/json": {"schema": _inline_schema(CaptionedIn)}}}}

    @app.post("/captioned", response_model=CaptionedOut, openapi_extra=captioned_body,
              summary="Caption an image fetched from an allowlisted URL (off unless enabled)",
              responses={**errors, 403: {"description": "fetching disabled, host not allowed or non-public address"},
                         502: {"description": "the image server failed"}, 504: {"description": "download timeout"}})
    async def captioned(request: Request, raw: RawParams = Depends(query_params)) -> dict[str, Any]:
        params = resolve(raw)
        body: CaptionedIn = await read_json(request, CaptionedIn)
        if url_fetcher is None:
            raise HTTPException(403, f"fetching images by URL is disabled on this server: upload the image to "
                                     f"/predict instead (operators: set {env_prefix}_URL_FETCH=1 and "
                                     f"{env_prefix}_URL_ALLOWLIST)")
        try:
            data = await url_fetcher.fetch(body.imageUrl)
        except UrlFetchError as exc:
            raise HTTPException(exc.status, exc.detail) from None
        images = await decode([(data, body.imageName or body.imageUrl)])
        result = _captions_json((await caption(images, params))[0])
        return {"imageName": body.imageName, "imageUrl": body.imageUrl, **result}

    hf_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline_schema(HFRequest)},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}}

    @app.post("/v1/caption", response_model=list[GeneratedText], openapi_extra=hf_body, responses=errors,
              summary="Hugging Face image-to-text convention: raw image, multipart or JSON {inputs, parameters}")
    async def hf_caption(request: Request, raw: RawParams = Depends(hf_query_params)) -> list[dict[str, Any]]:
        ready_backend()
        kind = media_type(request)
        if kind == "application/json":
            body: HFRequest = await read_json(request, HFRequest)
            p = body.parameters or HFParameters()
            raw = raw.merged(RawParams(p.num_beams, p.max_new_tokens, p.num_return_sequences, p.repetition_penalty,
                                       p.no_repeat_ngram_size))
            params = resolve(raw)
            blobs = [(decode_base64_image(body.inputs), "inputs")]
        elif kind == "multipart/form-data":
            params = resolve(raw)
            blobs = await read_files(request, "file", max_files=1)
        elif kind.startswith("image/") or kind == "application/octet-stream":
            params = resolve(raw)
            blobs = [(await read_body(request, settings.max_body_bytes), "body")]
        else:
            raise HTTPException(415, f"unsupported Content-Type {kind or '(none)'}: send image/* bytes, "
                                     "multipart/form-data (field 'file') or application/json {inputs, parameters}")
        images = await decode(blobs)
        captions = (await caption(images, params))[0]
        return [{"generated_text": text, "score": _score(score)} for text, score in captions]

    return app
