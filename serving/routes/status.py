"""Liveness and readiness: /health (are the process and its model thread answering?) and /ready (is the model
loaded, and which one)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from serving.context import ServingContext, serving_context
from serving.errors import ErrorResponse
from serving.imageguard import ACCEPTED_FORMATS
from serving.params import RawParams, resolve_params

router = APIRouter()

LIMIT_KEYS = ("max_body_bytes", "max_pixels", "max_side", "max_aspect_ratio", "max_files", "max_batch_size",
              "queue_size", "max_beam_size", "body_timeout_s", "model_timeout_s")


@router.get("/health", summary="Liveness: 200 while the process answers (the model may still be loading); 503 when "
                                "its model failed to load or its model thread is stuck",
            responses={503: {"description": "the model failed to load, or the model thread has been on one batch "
                                            "longer than a request's deadline"}})
async def health(context: ServingContext = Depends(serving_context)) -> JSONResponse:
    if context.load_failed is not None:
        failed = context.not_ready()
        return ErrorResponse({"status": "load_failed", "detail": failed.detail}, status_code=503,
                             headers=failed.headers)
    stuck = context.model_stuck_seconds()
    if stuck is None:
        return JSONResponse({"status": "ok"})
    detail = (f"the model thread has been running one batch for {stuck:.0f} s, longer than a request's deadline "
              f"({context.settings.model_timeout_s:g} s): caption requests time out until it returns; restart the "
              "process if it does not")
    return ErrorResponse({"status": "model_stuck", "detail": detail}, status_code=503, headers=context.retry_after)


@router.get("/ready", summary="Readiness: 503 while the model loads (in the background, after the port opens) or when "
                              "it failed to load; then its description (never a file path), limits and defaults",
            responses={503: {"description": "the model is loading, or failed to load (Retry-After)"}})
async def ready(context: ServingContext = Depends(serving_context)) -> dict[str, Any]:
    backend, settings = context.ready_backend(), context.settings
    requests = context.request_limits
    limits: dict[str, Any] = {key: getattr(settings, key) for key in LIMIT_KEYS}
    limits["max_len_limit"] = requests.max_len
    limits["image_formats"] = list(ACCEPTED_FORMATS.values())
    defaults = resolve_params(RawParams(), settings, backend, requests)
    return {"status": "ready", "model": context.model_info, "limits": limits,
            "defaults": {"beam_size": defaults.beam_size, "max_len": defaults.max_len,
                         "num_captions": defaults.num_captions},
            "repetition_controls": requests.repetition_controls, "url_fetch": context.url_fetcher is not None}
