"""Request bodies in memory only: size- and time-limited reading, strict JSON, multipart and base64 parsing."""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import math
from dataclasses import dataclass, field
from typing import Any

import pydantic_core
from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from serving.errors import plain_text, validation_detail
from serving.settings import ServingSettings

CLOSE = {"Connection": "close"}  # the rest of an unread body must not be taken for the next request


@dataclass
class UploadedFile:
    """One file part of a multipart body, kept in memory (the client's file name is only a label)."""

    field: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def too_large(limit: int) -> HTTPException:
    """413 naming the limit; the connection closes, the rest of the body unread."""
    return HTTPException(413, f"request body is larger than the limit of {limit} bytes", headers=CLOSE)


async def read_body(request: Request, settings: ServingSettings) -> bytes:
    """The whole body, refused with 413 (from Content-Length, or as soon as the streamed bytes pass the limit) and
    with 408 when it has not all arrived within ``body_timeout_s``; both close the connection."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.body_timeout_s
    chunks = request.stream().__aiter__()
    parts: list[bytes] = []
    received = 0
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), deadline - loop.time())
        except StopAsyncIteration:
            return b"".join(parts)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body did not arrive within {settings.body_timeout_s:g} s "
                                     f"({received} bytes received)", headers=CLOSE) from None
        except ClientDisconnect:
            raise HTTPException(400, "the client closed the connection before the body ended", headers=CLOSE) from None
        received += len(chunk)
        if received > limit:
            raise too_large(limit)
        parts.append(chunk)


def parse_strict_json(body: bytes) -> Any:
    """The body as JSON the way RFC 8259 has it: UTF-8 (a BOM is skipped), no NaN or Infinity, no number out of
    range such as 1e400, no lone surrogate; anything else is a 422 that quotes none of it."""
    if body.startswith(codecs.BOM_UTF8):
        body = body[len(codecs.BOM_UTF8):]
    try:
        value = pydantic_core.from_json(body, allow_inf_nan=False, cache_strings=False)
    except ValueError as exc:
        raise HTTPException(422, f"the body is not valid JSON (UTF-8 text, finite numbers, no NaN or Infinity): "
                                 f"{plain_text(str(exc), 200)}") from None
    where = _non_finite_number_at(value)
    if where is not None:
        raise HTTPException(422, f"the body is not valid JSON: the number at {where.lstrip('.') or 'the top level'} "
                                 "is out of range (JSON numbers must be finite)")
    return value


def _non_finite_number_at(value: Any) -> str | None:
    """The path (``.parameters.num_beams``, ``.items[2]``) of the first infinite or NaN number in value, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else ""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        inner = _non_finite_number_at(item)
        if inner is not None:
            step = f"[{key}]" if isinstance(key, int) else f".{plain_text(key, 40)}"
            return step + inner
    return None


async def read_json(request: Request, model: type[BaseModel], settings: ServingSettings) -> Any:
    """A JSON body validated by ``model``: 415 for another Content-Type, 422 listing what is wrong (with excerpts)."""
    if media_type(request) != "application/json":
        raise HTTPException(415, f"expected a JSON body (Content-Type: application/json), got "
                                 f"{plain_text(media_type(request)) or 'no Content-Type'}")
    value = parse_strict_json(await read_body(request, settings))
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise HTTPException(422, validation_detail(exc.errors(include_url=False, include_context=False))) from None


async def read_files(request: Request, field: str, max_files: int, settings: ServingSettings, *,
                     ignore_text_fields: bool = False) -> list[tuple[bytes, str]]:
    """(bytes, label) of the files of a multipart body's ``field``; any other field is a 422 unless
    ``ignore_text_fields`` (a share from a phone may add a title or text)."""
    kind = media_type(request)
    if kind != "multipart/form-data":
        raise HTTPException(415, f"expected multipart/form-data with the image(s) in field {field!r}, got "
                                 f"{plain_text(kind) or 'no Content-Type'}")
    body = await read_body(request, settings)
    files, fields = parse_multipart(body, request.headers["content-type"], frozenset({field}), max_files + 8)
    others = sorted({f.field for f in files if f.field != field} | (set() if ignore_text_fields else set(fields)))
    if others:
        listed = ", ".join(repr(plain_text(name, 40)) for name in others[:10])
        raise HTTPException(422, f"unknown form fields [{listed}]: send the image(s) in field {field!r} and "
                                 "decoding parameters as query parameters")
    if not files:
        raise HTTPException(422, f"no file in form field {field!r}")
    if len(files) > max_files:
        raise HTTPException(422, f"too many files: {len(files)} (at most {max_files} per request)")
    return [(f.data, f.filename or field) for f in files]


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case ('' when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def parse_multipart(body: bytes, content_type: str, file_fields: frozenset[str], max_parts: int
                    ) -> tuple[list[UploadedFile], dict[str, list[str]]]:
    """Split a multipart/form-data body into files (parts with a file name, or named in ``file_fields``) and text
    fields, entirely in memory; malformed bodies give 422."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(422, "multipart body without a boundary in its Content-Type")
    parts: list[_Part] = []
    current: dict[str, object] = {"part": _Part(), "name": bytearray(), "value": bytearray()}

    def on_part_begin() -> None:
        current["part"] = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current["name"] += data[start:end]  # type: ignore[operator]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        current["value"] += data[start:end]  # type: ignore[operator]

    def on_header_end() -> None:
        part: _Part = current["part"]  # type: ignore[assignment]
        name = bytes(current["name"]).decode("latin-1").lower()  # type: ignore[arg-type]
        part.headers[name] = bytes(current["value"]).decode("latin-1")  # type: ignore[arg-type]
        current["name"], current["value"] = bytearray(), bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part: _Part = current["part"]  # type: ignore[assignment]
        part.data += data[start:end]

    def on_part_end() -> None:
        parts.append(current["part"])  # type: ignore[arg-type]
        if len(parts) > max_parts:
            raise HTTPException(422, f"too many parts in the multipart body (at most {max_parts})")

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise HTTPException(422, f"malformed multipart body: {plain_text(str(exc), 200)}") from None
    files: list[UploadedFile] = []
    fields: dict[str, list[str]] = {}
    for part in parts:
        _, disposition = parse_options_header(part.headers.get("content-disposition", ""))
        if b"name" not in disposition:
            raise HTTPException(422, "a multipart part has no name in its Content-Disposition header")
        name = disposition[b"name"].decode("utf-8", "replace")
        filename = disposition[b"filename"].decode("utf-8", "replace") if b"filename" in disposition else None
        if filename is not None or name in file_fields:
            files.append(UploadedFile(name, filename, part.headers.get("content-type"), bytes(part.data)))
        else:
            fields.setdefault(name, []).append(part.data.decode("utf-8", "replace"))
    return files, fields


def decode_base64_image(text: str) -> bytes:
    """Bytes of a base64 string, with or without a ``data:image/...;base64,`` prefix (422 when malformed)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise HTTPException(422, "data URLs must be base64-encoded (data:image/...;base64,...)")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(422, f"the field 'inputs' is not valid base64: {plain_text(str(exc), 200)}") from None
    if not data:
        raise HTTPException(422, "the field 'inputs' is empty: expected a base64-encoded image")
    return data
