"""Image uploads checked before any decoding: an explicit list of formats (415 otherwise) and size limits read from
the file header (pixels, longest side, aspect ratio); then decoded with data.images.open_image."""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from PIL import Image

from data.images import ImageLoadError, open_image
from serving.errors import plain_text
from serving.settings import ServingSettings

logger = logging.getLogger("serving")

# Pillow's format id -> the name answers use. Only these are ever handed to Pillow (GIF, WebP, TIFF: first frame).
ACCEPTED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF"}
ACCEPTED_LIST = ", ".join(ACCEPTED_FORMATS.values())

# (offset, signature, name) of formats that are recognised only to be refused by name.
REFUSED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%!PS", "PostScript/EPS"), (0, b"\xc5\xd0\xd3\xc6", "EPS"), (0, b"%PDF", "PDF"),
    (0, b"<svg", "SVG"), (0, b"<?xml", "XML/SVG"), (0, b"\x00\x00\x01\x00", "ICO"), (0, b"\x00\x00\x02\x00", "CUR"),
    (0, b"8BPS", "PSD"), (0, b"icns", "ICNS"), (0, b"qoif", "QOI"), (0, b"DDS ", "DDS"), (0, b"gimp xcf", "XCF"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"), (0, b"\xff\x0a", "JPEG XL"), (4, b"ftypavi", "AVIF"),
    (4, b"ftyphei", "HEIC"), (4, b"ftyphev", "HEIC"), (4, b"ftypmif1", "HEIF"), (4, b"ftypmsf1", "HEIF"),
    (0, b"\x76\x2f\x31\x01", "OpenEXR"), (0, b"#?RADIANCE", "Radiance HDR"), (0, b"\x59\xa6\x6a\x95", "Sun raster"),
    (0, b"SIMPLE  =", "FITS"), (0, b"/* XPM */", "XPM"), (0, b"#define", "XBM"), (0, b"BLP", "BLP"),
    (0, b"FORM", "IFF"), (0, b"II+\x00", "BigTIFF"), (0, b"MM\x00+", "BigTIFF"), (0, b"\x1a\x45\xdf\xa3", "WebM"),
    (0, b"PK\x03\x04", "ZIP"), (0, b"\x1f\x8b", "gzip"), (0, b"{", "JSON"),
    *((0, b"P%d" % n, "PNM (PPM/PGM/PBM)") for n in range(1, 8)),
)
_JPEG_MAX_SEGMENTS = 512  # markers scanned for the frame header; real files have a few dozen at most


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may declare in its header: pixels in all, longest side, longer / shorter side."""

    max_pixels: int
    max_side: int
    max_aspect_ratio: float

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> ImageLimits:
        return cls(settings.max_pixels, settings.max_side, settings.max_aspect_ratio)

    def problem(self, width: int, height: int) -> str | None:
        """Why an image of width x height is refused, or None."""
        if width <= 0 or height <= 0:
            return f"invalid image size {width}x{height}"
        if max(width, height) > self.max_side:
            return f"image is {width}x{height}: a side is above the limit of {self.max_side} pixels"
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            return (f"image is {width}x{height}: its aspect ratio is above the limit of "
                    f"{self.max_aspect_ratio:g} to 1")
        if width * height > self.max_pixels:
            return f"image is {width}x{height} = {width * height} pixels, above the limit of {self.max_pixels} pixels"
        return None


def sniff_format(data: bytes) -> str | None:
    """Pillow's id of an accepted format from the file signature; None when the data matches none of them."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def refused_format_name(data: bytes) -> str | None:
    """The name of a recognised format that is not accepted (EPS, PDF, SVG, HEIC...), or None."""
    for offset, signature, name in REFUSED_SIGNATURES:
        if data[offset:offset + len(signature)] == signature:
            return name
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) as the file header declares them, without decoding; None when the header cannot be read
    here (Pillow's header reading, checked the same way, decides then)."""
    try:
        return _HEADER_READERS[fmt](data)
    except (struct.error, IndexError, KeyError):
        return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    return struct.unpack_from(">II", data, 16) if data[12:16] == b"IHDR" else None  # type: ignore[return-value]


def _gif_size(data: bytes) -> tuple[int, int]:
    return struct.unpack_from("<HH", data, 6)  # type: ignore[return-value]  # the logical screen


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header_bytes,) = struct.unpack_from("<I", data, 14)
    if header_bytes == 12:  # OS/2 BITMAPCOREHEADER
        return struct.unpack_from("<HH", data, 18)  # type: ignore[return-value]
    width, height = struct.unpack_from("<ii", data, 18)
    return width, abs(height)  # a negative height means top-down rows


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: the canvas
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L":  # lossless: 14 bits each, after a signature byte
        (bits,) = struct.unpack_from("<I", data, 21)
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The frame header (SOFn) found by walking the marker segments, as decoders do."""
    pos = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        if data[pos] != 0xFF:
            return None
        while data[pos] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos]
        pos += 1
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack_from(">HH", data, pos + 3)
            return width, height
        (length,) = struct.unpack_from(">H", data, pos)
        pos += length
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first image file directory."""
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack_from(order + "I", data, 4)
    (entries,) = struct.unpack_from(order + "H", data, offset)
    found: dict[int, int] = {}
    for index in range(min(entries, 1024)):
        tag, kind, _, value = struct.unpack_from(order + "HHI4s", data, offset + 2 + 12 * index)
        if tag in (256, 257):
            found[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), value)[0]
    return (found[256], found[257]) if len(found) == 2 else None


_HEADER_READERS: dict[str, Callable[[bytes], tuple[int, int] | None]] = {
    "JPEG": _jpeg_size, "PNG": _png_size, "WEBP": _webp_size, "GIF": _gif_size, "BMP": _bmp_size, "TIFF": _tiff_size}


def check_upload(data: bytes, name: str, limits: ImageLimits) -> str:
    """The upload's format, checked from its first bytes before any decoding: 415 for a format outside the list
    (named when recognised), 422 for an empty upload or a header over a limit."""
    label = plain_text(name)
    if not data:
        raise HTTPException(422, f"{label}: empty upload, not an image")
    fmt = sniff_format(data)
    if fmt is None:
        known = refused_format_name(data)
        what = f"{known} images are not accepted" if known else "not an image in an accepted format"
        raise HTTPException(415, f"{label}: {what}; accepted formats: {ACCEPTED_LIST}")
    size = header_size(data, fmt)
    problem = limits.problem(*size) if size is not None else None
    if problem:
        raise HTTPException(422, f"{label}: {problem}")
    return fmt


def decode_upload(data: bytes, name: str, fmt: str, limits: ImageLimits,
                  prepare: Callable[[Image.Image], Any] | None = None) -> Any:
    """Open the checked upload with its format's decoder only, check the size Pillow read, decode to RGB (EXIF
    orientation applied), then ``prepare`` it; HTTPException 422 names a bad upload."""
    label = plain_text(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limits are checked just below
            image = Image.open(io.BytesIO(data), formats=[fmt])
        with image:
            problem = limits.problem(*image.size)
            if problem:
                raise HTTPException(422, f"{label}: {problem}")
            rgb = open_image(image, max_pixels=limits.max_pixels, name=label)
        return prepare(rgb) if prepare is not None else rgb
    except HTTPException:
        raise
    except ImageLoadError as exc:
        raise HTTPException(422, str(exc)) from None
    except Exception as exc:  # any decoder failure is the upload's problem, never a 500
        logger.info("%s: %s upload refused by its decoder: %r", label, fmt, exc)
        raise HTTPException(422, f"{label}: corrupt or truncated {ACCEPTED_FORMATS[fmt]} image "
                                 f"({type(exc).__name__}: {plain_text(str(exc))})") from None


def check_uploads(blobs: list[tuple[bytes, str]], limits: ImageLimits) -> list[str]:
    """The format of every (data, name) upload, all checked before any is decoded: one hostile file in a batch costs
    microseconds, and no decoding of the others."""
    return [check_upload(data, name, limits) for data, name in blobs]


def decode_uploads(blobs: list[tuple[bytes, str]], formats: list[str], limits: ImageLimits,
                   prepare: Callable[[Image.Image], Any] | None = None) -> list[Any]:
    """Decode (and prepare) checked uploads, in order; run it in a worker thread, never on the event loop."""
    return [decode_upload(data, name, fmt, limits, prepare) for (data, name), fmt in zip(blobs, formats)]
