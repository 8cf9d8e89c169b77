"""Request bodies in memory only: size-limited reading, multipart and base64 parsing, safe image decoding."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from data.images import ImageLoadError, open_image

logger = logging.getLogger("serving")


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
    return HTTPException(413, f"request body is larger than the limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 from Content-Length or as soon as the streamed bytes pass ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise too_large(limit)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


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
        raise HTTPException(422, f"malformed multipart body: {exc}") from None
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
        raise HTTPException(422, f"inputs is not valid base64: {exc}") from None
    if not data:
        raise HTTPException(422, "inputs is empty: expected a base64-encoded image")
    return data


def _decode_all(blobs: list[tuple[bytes, str]], max_pixels: int, prepare: Callable[[Image.Image], Any] | None
                ) -> list[Any]:
    """Decode every blob to RGB (EXIF orientation applied), then ``prepare`` it; HTTPException 422 names a bad one."""
    items = []
    for data, name in blobs:
        try:
            image = open_image(data, max_pixels=max_pixels, name=name)
            items.append(prepare(image) if prepare is not None else image)
        except ImageLoadError as exc:
            raise HTTPException(422, str(exc)) from None
        except Exception as exc:  # any decoder failure is the upload's problem, never a 500
            logger.warning("%s: unexpected decoder error %r", name, exc)
            raise HTTPException(422, f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return items


async def decode_images(blobs: list[tuple[bytes, str]], max_pixels: int,
                        prepare: Callable[[Image.Image], Any] | None = None) -> list[Any]:
    """Decode (and prepare) uploads in a worker thread: never on the event loop, never in the model thread."""
    return await run_in_threadpool(_decode_all, blobs, max_pixels, prepare)
