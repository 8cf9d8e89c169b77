"""Tests for safe image opening, RGB conversion of every mode, size guards and the reference preprocessing."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from data.images import (
    ImageLoadError,
    load_image_tensor,
    open_image,
    preprocess,
    to_image_batch,
    to_rgb,
)
from models.config import IMAGENET_MEAN, IMAGENET_STD


def _mean(image: Image.Image) -> float:
    return float(np.asarray(image, dtype=np.float64).mean())


def test_open_image_grayscale_l_is_gray_not_black(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (32, 24), 128).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (32, 24)
    assert np.all(np.asarray(image) == 128)


def test_open_image_la_composites_over_white(tmp_path: Path) -> None:
    data = np.zeros((8, 16, 2), dtype=np.uint8)
    data[:, :, 0] = 100
    data[:, 8:, 1] = 255  # right half opaque gray, left half fully transparent
    path = tmp_path / "la.png"
    Image.fromarray(data, mode="LA").save(path)
    pixels = np.asarray(open_image(path))
    assert np.all(pixels[:, :8] == 255)
    assert np.all(pixels[:, 8:] == 100)


def test_open_image_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (5, 0, 10, 10))
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    pixels = np.asarray(open_image(path))
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # transparent black -> white, not black
    assert tuple(pixels[0, 9]) == (255, 0, 0)
    # without transparency the palette colours are kept
    plain = tmp_path / "plain.png"
    image.save(plain)
    assert tuple(np.asarray(open_image(plain))[0, 0]) == (0, 0, 0)


def test_open_image_rgba_composites_over_white(tmp_path: Path) -> None:
    data = np.zeros((4, 3, 4), dtype=np.uint8)
    data[:, 0] = (0, 0, 255, 255)  # opaque blue
    data[:, 1] = (0, 0, 255, 0)  # transparent
    data[:, 2] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "rgba.png"
    Image.fromarray(data, mode="RGBA").save(path)
    pixels = np.asarray(open_image(path)).astype(int)
    assert tuple(pixels[0, 0]) == (0, 0, 255)
    assert tuple(pixels[0, 1]) == (255, 255, 255)
    assert np.all(np.abs(pixels[0, 2] - 127) <= 1)


def test_open_image_cmyk_jpeg_converts_colours(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    image = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    image.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half white
    image.save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    pixels = np.asarray(open_image(path)).astype(int)
    assert np.all(pixels[:, :12] >= 245)
    red = pixels[:, 20:].reshape(-1, 3).mean(axis=0)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_open_image_16bit_png_is_scaled_to_8bit(tmp_path: Path) -> None:
    data = np.full((6, 8), 200 * 257, dtype=np.uint16)
    data[:, 4:] = 65535
    path = tmp_path / "gray16.png"
    Image.fromarray(data).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(open_image(path))
    assert np.all(pixels[:, :4] == 200)
    assert np.all(pixels[:, 4:] == 255)
    data[:, 4:] = 7  # a PNG tRNS key marks gray value 7 transparent: white, not near-black
    keyed = tmp_path / "gray16_trns.png"
    Image.fromarray(data).save(keyed, transparency=7)
    pixels = np.asarray(open_image(keyed))
    assert np.all(pixels[:, :4] == 200) and np.all(pixels[:, 4:] == 255)


def test_open_image_one_bit(tmp_path: Path) -> None:
    image = Image.new("1", (16, 16), 0)
    image.paste(1, (0, 0, 8, 16))
    path = tmp_path / "bits.png"
    image.save(path)
    pixels = np.asarray(open_image(path))
    assert np.all(pixels[:, :8] == 255) and np.all(pixels[:, 8:] == 0)
    assert _mean(open_image(path)) == pytest.approx(127.5)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32), mode="F"), 64),
        (Image.fromarray(np.full((4, 4), 180.0, dtype=np.float32), mode="F"), 180),
        (Image.fromarray(np.full((4, 4), 90, dtype=np.int32), mode="I"), 90),
        (Image.fromarray(np.full((4, 4), 100 * 257, dtype=np.int32), mode="I"), 100),
        (Image.new("I;16B", (4, 4), 50 * 257), 50),
        (Image.new("YCbCr", (4, 4), (128, 128, 128)), 128),
    ],
)
def test_to_rgb_numeric_modes(image: Image.Image, expected: int) -> None:
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.all(np.abs(np.asarray(rgb).astype(int) - expected) <= 1)


def test_open_image_applies_exif_orientation(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # red marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = open_image(path)
    assert image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert pixels[3, 16, 0] > 200 and pixels[3, 16, 2] < 60  # marker now top-right
    assert pixels[3, 3, 0] < 60 and pixels[3, 3, 2] > 200
    assert pixels[36, 16, 0] < 60


def test_open_image_accepts_bytes_streams_and_pil(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (5, 4), 77).save(buffer, format="PNG")
    data = buffer.getvalue()

    class Unseekable(io.RawIOBase):
        def __init__(self, payload: bytes) -> None:
            self._inner = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, target: bytearray) -> int:  # type: ignore[override]
            chunk = self._inner.read(len(target))
            target[: len(chunk)] = chunk
            return len(chunk)

    source = Image.new("RGB", (5, 4), (77, 77, 77))
    for item in (data, bytearray(data), io.BytesIO(data), Unseekable(data), source):
        image = open_image(item)
        assert image.mode == "RGB" and image.size == (5, 4)
        assert np.all(np.asarray(image) == 77)
    assert open_image(source) is not source
    assert list(tmp_path.iterdir()) == []  # nothing written to disk


def test_open_image_truncated_jpeg_names_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(noise).save(whole, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: corrupt or truncated"):
        open_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert open_image(whole).size == (64, 64)


def test_open_image_non_images_name_source(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("hello, not an image", encoding="utf-8")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg: not an image"):
        open_image(text)
    with pytest.raises(ImageLoadError, match=r"absent\.png: image file not found"):
        open_image(tmp_path / "absent.png")
    with pytest.raises(ImageLoadError, match=r"upload\.bin: not an image"):
        open_image(b"GIF89a garbage", name="upload.bin")
    with pytest.raises(ImageLoadError, match="empty data"):
        open_image(b"")
    with pytest.raises(ImageLoadError, match="unsupported image source type int"):
        open_image(123)  # type: ignore[arg-type]


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim ``width`` x ``height`` (CRC fixed, data not)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 20, 30)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize(
    ("width", "height", "pattern"),
    [
        (8000, 6000, r"8000x6000 = 48000000 pixels, above the limit of 40000000"),  # our own header check
        (10000, 10000, r"too large to decode safely"),  # PIL's warning zone, turned into an error
        (20000, 20000, r"too large to decode safely.*400000000"),  # PIL's hard limit
    ],
)
def test_open_image_refuses_huge_headers_before_decoding(tmp_path: Path, width: int, height: int, pattern: str) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header_size(width, height))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak
        with pytest.raises(ImageLoadError, match=r"bomb\.png: .*" + pattern):
            open_image(path)


def test_open_image_max_pixels_is_per_call(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 50), (1, 2, 3)).save(path)
    with pytest.raises(ImageLoadError, match=r"small\.png: image is 100x50 = 5000 pixels, above the limit of 4999"):
        open_image(path, max_pixels=4999)
    assert open_image(path, max_pixels=5000).size == (100, 50)
    assert open_image(path, max_pixels=None).size == (100, 50)
    with pytest.raises(ImageLoadError, match="in-memory: image is 100x50"):
        open_image(Image.new("RGB", (100, 50)), max_pixels=10, name="in-memory")


@pytest.mark.parametrize("img_size", [(24, 32), 16, (80, 70)])
def test_preprocess_matches_torchvision_compose(img_size: int | tuple[int, int]) -> None:
    from torchvision import transforms

    pixels = np.random.default_rng(1).integers(0, 256, size=(37, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    reference = transforms.Compose(
        [transforms.Resize(size), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )(image)
    ours = preprocess(image, img_size, IMAGENET_MEAN, IMAGENET_STD)
    assert ours.dtype == torch.float32 and ours.shape == (3, *size)
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)


def test_preprocess_converts_non_rgb_and_uses_custom_stats() -> None:
    tensor = preprocess(Image.new("L", (9, 7), 51), (4, 6), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert tensor.shape == (3, 4, 6)
    assert torch.allclose(tensor, torch.full_like(tensor, 51 / 255))


def test_load_image_tensor_and_to_image_batch_mix_sources(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (30, 20), (255, 0, 0)).save(path)
    buffer = io.BytesIO()
    Image.new("L", (10, 10), 0).save(buffer, format="PNG")
    single = load_image_tensor(path, 8, IMAGENET_MEAN, IMAGENET_STD)
    assert single.shape == (3, 8, 8)
    ready = preprocess(Image.new("RGB", (8, 8), (0, 0, 255)), 8, IMAGENET_MEAN, IMAGENET_STD)
    batch = to_image_batch(
        [
            path,
            str(path),
            buffer.getvalue(),
            Image.new("RGBA", (5, 5), (0, 0, 0, 0)),
            ready,
            torch.stack([ready, ready]),
        ],
        8,
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    assert batch.shape == (7, 3, 8, 8) and batch.dtype == torch.float32
    assert torch.equal(batch[0], single) and torch.equal(batch[1], single)
    assert torch.equal(batch[4], ready) and torch.equal(batch[6], ready)
    white = preprocess(Image.new("RGB", (8, 8), (255, 255, 255)), 8, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(batch[3], white)  # transparent RGBA became white, not black
    assert to_image_batch([ready.half()], 8, IMAGENET_MEAN, IMAGENET_STD).dtype == torch.float32


def test_to_image_batch_validates_tensors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image 1: tensor shape \(3, 8, 9\) does not match \(3, 8, 8\)"):
        to_image_batch([torch.zeros(3, 8, 8), torch.zeros(3, 8, 9)], 8, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"image 0: tensor shape \(1, 8, 8\)"):
        to_image_batch([torch.zeros(1, 8, 8)], 8, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="dtype torch.uint8 is not floating point"):
        to_image_batch([torch.zeros(3, 8, 8, dtype=torch.uint8)], 8, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="no images"):
        to_image_batch([], 8, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ImageLoadError, match=r"gone\.jpg"):
        to_image_batch([tmp_path / "gone.jpg"], 8, IMAGENET_MEAN, IMAGENET_STD)
