"""The serving package's guards in process: image headers read without decoding, refused formats named, strict JSON,
error answers that always render, the micro-batcher freeing a place when a request's deadline passes, settings."""

from __future__ import annotations

import asyncio
import io
import json
import math
import struct
import sys
import threading
from pathlib import Path

import pytest
from fastapi import HTTPException
from PIL import Image
from processes import run_watched

from serving import MicroBatcher, QueueFullError, SettingsError, load_settings
from serving.batching import ModelThread
from serving.errors import ErrorResponse, excerpt, validation_detail
from serving.imageguard import ImageLimits, check_upload, decode_upload, header_size, sniff_format
from serving.testing import image_bytes, sparse_png
from serving.uploads import parse_strict_json

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ImageLimits(max_pixels=40_000_000, max_side=16_384, max_aspect_ratio=20.0)


def tiff(width: int, height: int, big_endian: bool) -> bytes:
    """A TIFF header (first directory: width and height as LONG values) in either byte order."""
    order = ">" if big_endian else "<"
    entries = struct.pack(order + "HHII", 256, 4, 1, width) + struct.pack(order + "HHII", 257, 4, 1, height)
    return (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(order + "IH", 8, 2) + entries + b"\x00" * 4


@pytest.mark.parametrize(("fmt", "kwargs"), [
    ("JPEG", {}), ("JPEG", {"progressive": True}), ("JPEG", {"exif": Image.Exif().tobytes()}), ("PNG", {}),
    ("WEBP", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("BMP", {}), ("TIFF", {}),
    ("TIFF", {"compression": "tiff_lzw"}),
])
def test_header_size_matches_pillow_without_decoding(fmt: str, kwargs: dict) -> None:
    data = image_bytes((123, 45), fmt, **kwargs)
    assert sniff_format(data) == fmt
    assert tuple(header_size(data, fmt) or ()) == Image.open(io.BytesIO(data)).size == (123, 45)


def test_header_size_of_webp_with_alpha_top_down_bmp_and_both_tiff_byte_orders() -> None:
    alpha = image_bytes((77, 33), "WEBP", mode="RGBA", color=(1, 2, 3, 100))
    top_down = bytearray(image_bytes((20, 10), "BMP"))
    top_down[22:26] = struct.pack("<i", -10)
    assert alpha[12:16] == b"VP8X" and header_size(alpha, "WEBP") == (77, 33)
    assert header_size(bytes(top_down), "BMP") == (20, 10)
    assert header_size(tiff(300, 7, big_endian=True), "TIFF") == (300, 7)
    assert header_size(tiff(300, 7, big_endian=False), "TIFF") == (300, 7)


def test_header_size_of_a_truncated_header_is_unknown_not_an_error() -> None:
    assert header_size(b"\x89PNG\r\n\x1a\n\x00\x00", "PNG") is None
    assert header_size(b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG") is None
    assert header_size(b"II*\x00\xff\xff\xff\x00", "TIFF") is None


@pytest.mark.parametrize(("data", "name"), [
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", "EPS"), (b"%PDF-1.7\n", "PDF"), (b"<svg xmlns=", "SVG"),
    (b"\x00\x00\x00\x18ftypheic", "HEIC"), (b"\x00\x00\x00\x1cftypavif", "AVIF"), (b"8BPS\x00\x01", "PSD"),
    (b"P6\n3 2\n255\n", "PNM"), (b"\x00\x00\x01\x00\x01\x00", "ICO"), (b"II+\x00\x08\x00", "BigTIFF"),
])
def test_refused_formats_are_415_and_named(data: bytes, name: str) -> None:
    with pytest.raises(HTTPException) as info:
        check_upload(data + b"\x00" * 64, "upload.bin", LIMITS)
    assert info.value.status_code == 415 and name in info.value.detail and "upload.bin" in info.value.detail


def test_unrecognised_data_is_415_and_empty_data_422() -> None:
    with pytest.raises(HTTPException) as unknown:
        check_upload(b"just some text", "notes.txt", LIMITS)
    with pytest.raises(HTTPException) as empty:
        check_upload(b"", "empty.png", LIMITS)
    assert unknown.value.status_code == 415
    assert unknown.value.detail.startswith("notes.txt: not an image in an accepted format; accepted formats: JPEG")
    assert empty.value.status_code == 422 and "empty" in empty.value.detail


@pytest.mark.parametrize(("size", "words"), [
    ((1, 39_000_000), "a side is above the limit of 16384"), ((16_385, 1_000), "a side is above"),
    ((16_000, 100), "aspect ratio is above the limit of 20 to 1"), ((7_000, 7_000), "above the limit of 40000000"),
    ((0, 10), "invalid image size"),
])
def test_limits_name_what_is_over(size: tuple[int, int], words: str) -> None:
    assert words in (LIMITS.problem(*size) or "")


def test_limits_accept_phone_photos_and_panoramas() -> None:
    assert LIMITS.problem(4000, 3000) is None and LIMITS.problem(16_000, 2_000) is None
    assert LIMITS.problem(1, 1) is None and LIMITS.problem(20, 1) is None


def test_hostile_strip_is_refused_from_its_first_bytes() -> None:
    strip = sparse_png(1, 39_000_000)
    with pytest.raises(HTTPException) as info:
        check_upload(strip[:40], "strip.png", LIMITS)  # the header alone is enough
    assert info.value.status_code == 422 and "1x39000000" in info.value.detail


def test_pillow_size_is_checked_again_before_decoding() -> None:
    """A GIF whose screen is 30 x 30 but whose first frame is 30 x 20,000: the header check passes, Pillow's size
    (the one it would decode) is refused before decoding."""
    data = bytearray(image_bytes((30, 30), "GIF"))
    frame = data.index(b"\x2c\x00\x00\x00\x00\x1e\x00\x1e\x00")  # image descriptor: at 0, 0, 30 x 30
    data[frame + 7:frame + 9] = struct.pack("<H", 20_000)
    fmt = check_upload(bytes(data), "frame.gif", LIMITS)
    with pytest.raises(HTTPException) as info:
        decode_upload(bytes(data), "frame.gif", fmt, LIMITS)
    assert info.value.status_code == 422 and "30x20000" in info.value.detail and "side" in info.value.detail


@pytest.mark.parametrize(("body", "words"), [
    (b'{"a": NaN}', "not valid JSON"), (b'{"a": Infinity}', "not valid JSON"),
    (b'{"a": {"b": [1, 1e400]}}', "a.b[1] is out of range"), (b"[1e999]", "[0] is out of range"),
    (b'{"a": "\xff"}', "not valid JSON"), ('{"a": 1}'.encode("utf-16"), "not valid JSON"),
    (b'{"a": "\\ud800"}', "not valid JSON"), (b"[" * 5000, "not valid JSON"), (b"", "not valid JSON"),
])
def test_strict_json_refuses_what_rfc_8259_does_not_allow(body: bytes, words: str) -> None:
    with pytest.raises(HTTPException) as info:
        parse_strict_json(body)
    assert info.value.status_code == 422 and words in info.value.detail and len(info.value.detail) < 400


def test_strict_json_accepts_a_bom_and_negative_zero() -> None:
    assert parse_strict_json(b'\xef\xbb\xbf{"a": -0.0, "b": [1e308]}') == {"a": -0.0, "b": [1e308]}


def test_error_response_renders_any_input() -> None:
    hostile = {"nan": math.nan, "inf": -math.inf, "bytes": b"\xff\xfe" * 1000, "surrogate": "x\ud800y",
               "big": 10**5000, "long": "z" * 100_000, "nested": {"a": [1, 2, 3]}, "object": object()}
    rendered = json.loads(ErrorResponse({"detail": hostile}).body)["detail"]
    assert rendered["nan"] == "nan" and rendered["surrogate"] == "x?y" and rendered["nested"] == {"a": [1, 2, 3]}
    assert len(json.dumps(rendered)) < 3500 and "digits" in rendered["big"] and "more characters" in rendered["long"]
    errors = [{"loc": ("body", i), "msg": "bad", "type": "t", "input": value}
              for i, value in enumerate(hostile.values())]
    listed = validation_detail(errors * 3)
    assert len(listed) == 11 and "more errors" in listed[-1]["msg"]
    assert json.loads(ErrorResponse({"detail": listed}).body)["detail"][1]["input"] == "-inf"
    assert excerpt(math.inf) == "inf" and excerpt([1, 2]) == "(an array of 2 items)"


# ---------------------------------------------------------------- micro-batcher deadlines, the model thread


def test_batcher_frees_the_place_of_a_request_whose_deadline_passed_and_refuses_at_once_when_full() -> None:
    """queue_size counts waiting images: a 2-image job fills a queue of 2, and the next job is refused at once."""
    gate, started = threading.Event(), threading.Event()

    def run(items: list[int], params: None) -> list[int]:
        started.set()
        gate.wait(30)
        return items

    async def scenario() -> tuple[int, int, bool, list[list[int]]]:
        batcher = MicroBatcher(run, max_batch_size=2, max_wait_ms=0, queue_size=2)
        await batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit([1], None))
            while not started.is_set():
                await asyncio.sleep(0.005)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(batcher.submit([2], None), 0.05)  # waits behind the stuck call, gives up
            waiting_after_timeout = batcher.waiting
            busy = batcher.busy_seconds()
            later = asyncio.ensure_future(batcher.submit([3, 4], None))  # fits: the abandoned job no longer counts
            await asyncio.sleep(0)
            try:
                await batcher.submit([5], None)
                full = False
            except QueueFullError:
                full = True
            gate.set()
            return waiting_after_timeout, int(busy > 0), full, [await running, await later]
        finally:
            gate.set()
            await batcher.stop()

    waiting, busy, full, results = asyncio.run(scenario())
    assert waiting == 0 and busy == 1 and full and results == [[1], [3, 4]]


def test_model_thread_reports_how_long_it_has_been_busy() -> None:
    thread, gate = ModelThread(name="test-model"), threading.Event()

    async def scenario() -> tuple[float, float, float, str]:
        future = thread.run(lambda: gate.wait(30) and threading.current_thread().name)
        idle_or_busy = thread.busy_seconds()
        await asyncio.sleep(0.2)
        busy = thread.busy_seconds()
        gate.set()
        name = await future
        return idle_or_busy, busy, thread.busy_seconds(), name

    try:
        first, busy, after, name = asyncio.run(scenario())
    finally:
        gate.set()
        thread.stop()
    assert busy >= first and busy > 0.1 and after == 0.0 and name == "test-model"


def test_model_thread_stuck_in_a_call_does_not_keep_the_process_alive() -> None:
    code = ("import asyncio, time\nfrom serving.batching import ModelThread\n"
            "async def main():\n    thread = ModelThread()\n    thread.run(time.sleep, 3600)\n"
            "    await asyncio.sleep(0.1)\n    thread.stop()\n    assert not thread.join(0.1)\n"
            "asyncio.run(main())\nprint('exited')\n")
    result = run_watched([sys.executable, "-c", code], cwd=ROOT)
    assert result.returncode == 0 and "exited" in result.stdout, result.stderr


# ---------------------------------------------------------------- settings


def test_new_limits_come_from_the_environment() -> None:
    env = {"CAPTION_MAX_SIDE": "8000", "CAPTION_MAX_ASPECT_RATIO": "4.5", "CAPTION_BODY_TIMEOUT_S": "12",
           "CAPTION_MODEL_TIMEOUT_S": "0.5"}
    settings, _ = load_settings("CAPTION", {}, environ=env)
    assert (settings.max_side, settings.max_aspect_ratio, settings.body_timeout_s, settings.model_timeout_s) == (
        8000, 4.5, 12.0, 0.5)


@pytest.mark.parametrize(("env", "words"), [
    ({"CAPTION_MODEL_TIMEOUT_S": "nan"}, "CAPTION_MODEL_TIMEOUT_S"), ({"CAPTION_BODY_TIMEOUT_S": "inf"}, "finite"),
    ({"CAPTION_MAX_ASPECT_RATIO": "0.5"}, "max_aspect_ratio"), ({"CAPTION_MAX_SIDE": "0"}, "max_side"),
    ({"CAPTION_MODEL_TIMEOUT_S": "0"}, "model_timeout_s"),
])
def test_bad_new_limits_name_the_setting(env: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        load_settings("CAPTION", {}, environ=env)
