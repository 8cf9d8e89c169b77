"""Safe image loading, RGB conversion and the reference preprocessing, shared by training, demo and serving."""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from data.records import IMAGE_SUFFIXES

DEFAULT_MAX_PIXELS = 40_000_000
_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image
BatchItem = str | os.PathLike | bytes | bytearray | Image.Image | torch.Tensor


class ImageLoadError(ValueError):
    """An image could not be read safely; the message names the source (file name or given name)."""


def _source_name(source: object, name: str | None) -> str:
    """A human-readable name for error messages."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return str(getattr(source, "name", "") or "<stream>")


def open_image(
    source: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Open, validate and decode an image into a new RGB ``PIL.Image``.

    ``source`` is a path, raw bytes, a binary file object or a PIL image. The pixel count is checked from the header
    before decoding (``max_pixels=None`` disables the check; PIL's own ``Image.MAX_IMAGE_PIXELS`` guard still applies
    to files). EXIF orientation is applied and every mode is converted to RGB (alpha over white, 16-bit scaled), never
    replaced by a black image. Unreadable, truncated or oversized input raises :class:`ImageLoadError`.
    """
    label = _source_name(source, name)
    if isinstance(source, Image.Image):
        return _finish(source, label, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"{label}: image file not found" if not path.exists() else f"{label}: not a file")
        try:
            handle = open(path, "rb")  # closed by the with-block below
        except OSError as exc:
            raise ImageLoadError(f"{label}: cannot read file ({exc})") from None
        with handle:
            return _open_stream(handle, label, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(f"{label}: empty data, not an image")
        return _open_stream(io.BytesIO(bytes(source)), label, max_pixels)
    if hasattr(source, "read"):
        stream: IO[bytes] = source
        if not (hasattr(stream, "seekable") and stream.seekable()):
            stream = io.BytesIO(stream.read())
        return _open_stream(stream, label, max_pixels)
    raise ImageLoadError(f"{label}: unsupported image source type {type(source).__name__}")


def _open_stream(stream: IO[bytes], label: str, max_pixels: int | None) -> Image.Image:
    """Open lazily, check the header size, then decode and convert; the file object is not closed here."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    # PIL warns (above MAX_IMAGE_PIXELS) while opening; that is a refusal unless the caller allowed more pixels.
    bomb_action = "ignore" if max_pixels is None or (pil_limit is not None and max_pixels > pil_limit) else "error"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(bomb_action, Image.DecompressionBombWarning)
            image = Image.open(stream)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{label}: image is too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not an image or an unsupported image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{label}: cannot read image header ({exc})") from None
    with image:
        return _finish(image, label, max_pixels)


def _finish(image: Image.Image, label: str, max_pixels: int | None) -> Image.Image:
    """Size check, decode, EXIF orientation and RGB conversion; always returns a new image."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{label}: invalid image size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} pixels"
        )
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{label}: image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise ImageLoadError(f"{label}: corrupt or truncated image ({exc})") from None
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF must not lose the image; say so instead of failing silently
        warnings.warn(f"{label}: ignoring unreadable EXIF orientation ({exc})", UserWarning, stacklevel=4)
        oriented = image
    if oriented is None:  # pragma: no cover - only returned with in_place=True
        oriented = image
    rgb = to_rgb(oriented, label)
    return rgb.copy() if rgb is image else rgb


def to_rgb(image: Image.Image, name: str = "<PIL image>") -> Image.Image:
    """Convert any PIL mode to RGB properly (the reference replaced non-RGB images by black ones).

    Alpha (LA, PA, RGBA, palette or grayscale transparency) is composited over white; 16-bit modes are scaled by
    1/257; mode ``I`` is scaled by 1/257 when its values exceed 255 (16-bit data) and clipped otherwise; mode ``F`` is
    scaled by 255 when its values lie in [0, 1] and clipped to [0, 255] otherwise.
    """
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode == "RGB" and transparency is None:
        return image
    try:
        if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
            raw = np.asarray(image)
            gray = _numeric_to_8bit_range(raw.astype(np.float64), mode)
            if isinstance(transparency, (int, float)):  # a transparent gray value (PNG tRNS) becomes white
                gray = np.where(raw == transparency, 255.0, gray)
            return _gray_array_to_rgb(gray)
        if mode in _ALPHA_MODES or transparency is not None or _has_palette_alpha(image):
            rgba = image.convert("LA").convert("RGBA") if mode == "La" else image.convert("RGBA")
            background = Image.new("RGBA", image.size, _WHITE)
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"{name}: cannot convert image mode {mode!r} to RGB ({exc})") from None


def _numeric_to_8bit_range(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit integer or float gray values to the 0-255 range (not yet rounded or clipped)."""
    if mode in _SIXTEEN_BIT_MODES:
        return values / 257.0
    if mode == "I":
        return values / 257.0 if values.size and values.max() > 255 else values
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        values = values * 255.0
    return np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)


def _has_palette_alpha(image: Image.Image) -> bool:
    """True for palette images whose palette carries alpha."""
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _gray_array_to_rgb(values: np.ndarray) -> Image.Image:
    """Round and clip a float gray array to 8 bits and replicate it into 3 channels."""
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _size_hw(img_size: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an int (square, as the reference's 384x384) or an (H, W) pair."""
    if isinstance(img_size, int):
        height = width = img_size
    else:
        if len(img_size) != 2:
            raise ValueError(f"img_size must be an int or (height, width), got {img_size!r}")
        height, width = int(img_size[0]), int(img_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"img_size must be positive, got {img_size!r}")
    return height, width


def preprocess(
    image: Image.Image,
    img_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Resize to (H, W) with PIL's antialiased bilinear filter (no aspect preservation, no crop), scale to [0, 1] and
    normalise: the reference's ``Resize((H, W)) + ToTensor() + Normalize(mean, std)``. Returns (3, H, W) float32."""
    height, width = _size_hw(img_size)
    rgb = to_rgb(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    array = np.array(rgb, dtype=np.uint8, copy=True)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def load_image_tensor(
    source: ImageInput,
    img_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> torch.Tensor:
    """Open ``source`` safely and preprocess it to a (3, H, W) float32 tensor."""
    return preprocess(open_image(source, max_pixels=max_pixels, name=name), img_size, mean, std)


def to_image_batch(
    images: Sequence[BatchItem],
    img_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Stack images into a (B, 3, H, W) float32 batch.

    Tensors are taken as already preprocessed, (3, H, W) or (B, 3, H, W) floating point at ``img_size``; paths, bytes
    and PIL images go through :func:`load_image_tensor`.
    """
    height, width = _size_hw(img_size)
    parts: list[torch.Tensor] = []
    for position, item in enumerate(images):
        if isinstance(item, torch.Tensor):
            parts.append(_check_tensor(item, position, height, width))
        else:
            parts.append(load_image_tensor(item, (height, width), mean, std, max_pixels=max_pixels).unsqueeze(0))
    if not parts:
        raise ValueError("to_image_batch: no images given")
    return torch.cat(parts, dim=0)


def _check_tensor(item: torch.Tensor, position: int, height: int, width: int) -> torch.Tensor:
    """Validate a preprocessed image tensor and return it as (B, 3, H, W) float32 on the CPU."""
    if not item.is_floating_point():
        raise ValueError(
            f"image {position}: tensor dtype {item.dtype} is not floating point; pass preprocessed float tensors "
            "(or the raw image, which will be preprocessed)"
        )
    expected = f"(3, {height}, {width}) or (B, 3, {height}, {width})"
    batch = item.unsqueeze(0) if item.dim() == 3 else item
    if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, height, width):
        raise ValueError(f"image {position}: tensor shape {tuple(item.shape)} does not match {expected}")
    return batch.detach().to(device="cpu", dtype=torch.float32)




def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside a folder (by suffix), sorted by name."""
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
