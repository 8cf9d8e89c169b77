"""JSON error answers ``{"detail": ...}`` that render whatever the input was: short excerpts, finite numbers, text."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("serving")

EXCERPT_CHARS = 64  # of a client's value quoted back in an error
DETAIL_CHARS = 1_000  # of a whole error message
MAX_LISTED_ERRORS = 10  # validation errors listed in one answer


class ErrorResponse(JSONResponse):
    """A JSON error that always renders, whatever it holds: ASCII-escaped, texts cut short, no NaN or infinity,
    anything else as a short excerpt."""

    def render(self, content: Any) -> bytes:
        return json.dumps(json_safe(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def json_safe(value: Any) -> Any:
    """``value`` with every text cut to DETAIL_CHARS and every other non-JSON value replaced by its excerpt."""
    if isinstance(value, str):
        return plain_text(value, DETAIL_CHARS)
    if isinstance(value, Mapping):
        return {plain_text(str(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return excerpt(value)


def plain_text(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters (saying how much was left out), lone surrogates replaced."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def excerpt(value: Any) -> Any:
    """A short JSON-safe stand-in for a client's value: strings and bytes cut short, non-finite numbers as text,
    containers summarised by their size."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) < 10**15:
            return value
        return f"(an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits)"  # str() may refuse it
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return plain_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return plain_text(bytes(value[:EXCERPT_CHARS + 1]).decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return f"(an object with {len(value)} keys)"
    if isinstance(value, Sequence):
        return f"(an array of {len(value)} items)"
    return f"(a {type(value).__name__})"


def validation_detail(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic / FastAPI validation errors with their location, message and an excerpt of the offending input."""
    listed = []
    for error in errors[:MAX_LISTED_ERRORS]:
        item = {"loc": [part if isinstance(part, int) else plain_text(str(part)) for part in error.get("loc", ())],
                "msg": plain_text(str(error.get("msg", "")), DETAIL_CHARS), "type": str(error.get("type", ""))}
        if "input" in error:
            item["input"] = excerpt(error["input"])
        listed.append(item)
    if len(errors) > MAX_LISTED_ERRORS:
        listed.append({"loc": [], "msg": f"... and {len(errors) - MAX_LISTED_ERRORS} more errors", "type": "more"})
    return listed


def error_response(status: int, detail: Any, headers: Mapping[str, str] | None = None) -> ErrorResponse:
    """The error answer ``{"detail": ...}``."""
    return ErrorResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))


async def http_error(_: Request, exc: StarletteHTTPException) -> ErrorResponse:
    """Errors raised on purpose (ours and Starlette's 404 / 405)."""
    return error_response(exc.status_code, exc.detail, exc.headers)


async def request_validation_error(_: Request, exc: RequestValidationError) -> ErrorResponse:
    """Bad query parameters: 422 listing each with an excerpt of its value (FastAPI's own answer echoes it whole)."""
    return error_response(422, validation_detail(exc.errors()))


async def unexpected_error(_: Request, exc: Exception) -> ErrorResponse:
    """A bug: logged with its traceback, answered without one."""
    logger.error("unhandled error: %r", exc, exc_info=exc)
    return error_response(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error of the app answers through ErrorResponse."""
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, request_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error)
