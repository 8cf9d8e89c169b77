"""Hostile clients against real servers on loopback, both apps (api.py and the BLIP API): non-strict JSON, huge
invalid bodies, paths in /ready, refused formats, side and aspect limits, stalled bodies, deadlines, a hung model,
connection limits. No answer may be a 500, carry a traceback or a server path."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cache
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from test_api import pinned_fetcher
from test_blip_api import build_tiny_blip

from serving import CaptionParams, ServingSettings, create_app
from serving.testing import (
    RunningServer,
    checked_client,
    file_server,
    image_bytes,
    server_in_thread,
    sparse_png,
    uvicorn_server,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BLIP_DIR = ROOT / "blip-image-captioning-api"
ARTIFACTS = ROOT / "test-artifacts"
PNG = image_bytes((48, 32))
JPEG = image_bytes((64, 48), "JPEG")
BODY_TIMEOUT_S = 5  # small for the stalled-body test, still generous for loopback uploads on a loaded machine


# ---------------------------------------------------------------- servers


@dataclass
class App:
    """A running app: which one, its server, its settings prefix and the server paths no answer may show."""

    name: str
    server: RunningServer
    prefix: str
    secrets: tuple[str, ...]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("blip") / "model"
    build_tiny_blip(directory)
    return directory


def start_app(name: str, checkpoint: Path, blip_dir: Path, settings: dict[str, str], log_name: str,
              extra_args: tuple[str, ...] = ()) -> AbstractContextManager[RunningServer]:
    """api.py or the BLIP app under uvicorn, with these settings (keys without their CAPTION_ / BLIP_ prefix)."""
    if name == "api":
        env = {"CAPTION_CHECKPOINT": str(checkpoint), **{f"CAPTION_{k}": v for k, v in settings.items()}}
        return uvicorn_server("api:app", env, ARTIFACTS / f"{log_name}_api.log", extra_args=extra_args)
    env = {"BLIP_MODEL_DIR": str(blip_dir), **{f"BLIP_{k}": v for k, v in settings.items()}}
    return uvicorn_server("main:app", env, ARTIFACTS / f"{log_name}_blip.log", app_dir=BLIP_DIR, cwd=BLIP_DIR,
                          extra_args=extra_args)


def secrets_of(checkpoint: Path, blip_dir: Path) -> tuple[str, ...]:
    return (str(ROOT), str(checkpoint.parent), str(blip_dir.parent), "/tmp/", "site-packages", "Traceback")


@pytest.fixture(scope="module", params=["api", "blip"])
def app(request: pytest.FixtureRequest, module_checkpoint: Path, blip_dir: Path) -> Iterator[App]:
    """Each app once for the module, with a short body timeout and otherwise the documented defaults."""
    settings = {"MAX_WAIT_MS": "1", "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
    with start_app(request.param, module_checkpoint, blip_dir, settings, "hardening") as server:
        yield App(request.param, server, "CAPTION" if request.param == "api" else "BLIP",
                  secrets_of(module_checkpoint, blip_dir))
        log = server.log()
    assert "Traceback" not in log, log


def check_answer(response: httpx.Response, secrets: tuple[str, ...]) -> None:
    """No 500, no traceback or server path; every error is JSON {"detail": ...}."""
    response.read()
    assert response.status_code != 500, response.text
    for secret in secrets:
        assert secret not in response.text, (secret, response.text[:500])
    if response.status_code >= 400 and response.request.url.path != "/share":
        assert "detail" in response.json(), response.text


@pytest.fixture
def http(app: App) -> Iterator[httpx.Client]:
    """A client whose every answer is checked, and a server still healthy afterwards."""
    with checked_client(app.server, lambda response: check_answer(response, app.secrets)) as client:
        yield client


# ---------------------------------------------------------------- strict JSON, short errors


NON_STRICT_JSON = {
    "nan": b'{"inputs": "aGk=", "x": NaN}',
    "infinity": b'{"inputs": "aGk=", "x": Infinity}',
    "minus-infinity": b'{"inputs": "aGk=", "parameters": {"repetition_penalty": -Infinity}}',
    "1e400-parameter": b'{"inputs": "aGk=", "parameters": {"num_beams": 1e400}}',
    "1e400-unknown-key": b'{"inputs": "aGk=", "x": [1, 2, -1e400]}',
    "not-utf8": b'{"inputs": "\xff"}',
    "utf16": '{"inputs": "aGk="}'.encode("utf-16"),
    "lone-surrogate-key": b'{"inputs": "aGk=", "x\\ud800": 1}',
    "lone-surrogate-value": b'{"inputs": "\\udc00aGk="}',
    "deep-nesting": b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge-integer": b'{"inputs": "aGk=", "parameters": {"num_beams": ' + b"9" * 5000 + b"}}",
    "top-level-array": b'[{"inputs": "aGk="}]',
    "truncated": b'{"inputs": "aGk=", "parameters": {"num_beams": 3',
}


@pytest.mark.parametrize("case", list(NON_STRICT_JSON))
def test_non_strict_json_is_422_and_keeps_the_connection(app: App, case: str) -> None:
    host, port = app_address(app)
    connection = HTTPConnection(host, port, timeout=60)
    try:
        for path in ("/v1/caption", "/captioned"):
            connection.request("POST", path, NON_STRICT_JSON[case], {"Content-Type": "application/json"})
            answer = connection.getresponse()
            body = answer.read()
            sock = connection.sock
            assert answer.status == 422, body
            assert isinstance(json.loads(body)["detail"], (str, list)) and len(body) < 3000
            assert not answer.will_close  # the connection was not dropped: the next request reuses it
            connection.request("GET", "/health")
            health = connection.getresponse()
            assert health.status == 200 and json.loads(health.read()) == {"status": "ok"}
            assert connection.sock is sock
    finally:
        connection.close()


def test_huge_invalid_json_gets_a_short_422(http: httpx.Client) -> None:
    unterminated = b'{"inputs": "' + b"A" * 5_000_000
    wrong_type = json.dumps({"inputs": 12, "parameters": {"num_beams": "x" * 2_000_000}, "x" * 1000: "y"}).encode()
    long_value = "9" * 4000
    answers = [http.post("/v1/caption", content=unterminated, headers={"content-type": "application/json"}),
               http.post("/v1/caption", content=wrong_type, headers={"content-type": "application/json"}),
               http.post(f"/predict?beam_size={long_value}", files={"file": ("a.png", PNG, "image/png")}),
               http.post("/predict?" + "x" * 4000 + "=1", files={"file": ("a.png", PNG, "image/png")})]
    for answer in answers:
        assert answer.status_code == 422 and len(answer.content) < 3000, answer.text[:300]
    quoted = answers[1].json()["detail"]
    assert {tuple(item["loc"])[:2] for item in quoted} >= {("inputs",), ("parameters", "num_beams")}
    assert all(len(json.dumps(item.get("input"))) < 200 for item in quoted)


# ---------------------------------------------------------------- /ready


def test_ready_describes_the_model_without_a_path(http: httpx.Client, app: App) -> None:
    model = http.get("/ready").json()["model"]
    assert {"name", "kind", "parameters", "weights_sha256"} <= set(model)
    assert model["parameters"] > 1000 and len(model["weights_sha256"]) == 64
    assert "checkpoint" not in model and "model_dir" not in model
    assert not any("/" in str(value) for value in model.values())


# ---------------------------------------------------------------- formats


def eps() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buffer, "EPS")
    return buffer.getvalue()


def pillow_bytes(fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


REFUSED = {
    "EPS": eps,
    "PDF": lambda: pillow_bytes("PDF"),
    "ICO": lambda: pillow_bytes("ICO"),
    "PNM": lambda: pillow_bytes("PPM"),
    "SVG": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "PSD": lambda: b"8BPS\x00\x01" + b"\x00" * 64,
    "HEIC": lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
}


@pytest.mark.parametrize("fmt", list(REFUSED))
def test_formats_outside_the_list_are_415_naming_the_format(http: httpx.Client, fmt: str) -> None:
    data = REFUSED[fmt]()
    name = f"hostile.{fmt.lower()}"
    answers = [http.post("/predict", files={"file": (name, data, "image/jpeg")}),
               http.post("/predicts", files=[("files", ("good.png", PNG, "image/png")),
                                             ("files", (name, data, "image/png"))]),
               http.post("/v1/caption", content=data, headers={"content-type": "image/png"}),
               http.post("/v1/caption", json={"inputs": base64.b64encode(data).decode()})]
    for answer in answers:
        detail = answer.json()["detail"]
        assert answer.status_code == 415 and fmt in detail and "JPEG, PNG, WebP, GIF, BMP, TIFF" in detail, detail


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 10), color) for color in ((200, 30, 30), (30, 30, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


ACCEPTED = {
    "JPEG": lambda: JPEG,
    "PNG": lambda: PNG,
    "WebP": lambda: image_bytes((30, 20), "WEBP"),
    "WebP-lossless": lambda: image_bytes((30, 20), "WEBP", lossless=True),
    "GIF-animated": animated_gif,
    "BMP": lambda: image_bytes((30, 20), "BMP"),
    "TIFF": lambda: image_bytes((30, 20), "TIFF"),
    "TIFF-compressed": lambda: image_bytes((30, 20), "TIFF", compression="tiff_deflate"),
}


@pytest.mark.parametrize("fmt", list(ACCEPTED))
def test_accepted_formats_are_captioned(http: httpx.Client, fmt: str) -> None:
    data = ACCEPTED[fmt]()
    assert http.post("/predict", files={"file": (f"a.{fmt}", data, "image/x")}).json()["caption"]
    assert http.post("/v1/caption", content=data, headers={"content-type": "image/png"}).json()[0]["generated_text"]


# ---------------------------------------------------------------- sides and aspect ratio, from the header


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose frame header says width x height."""
    data = bytearray(image_bytes((64, 48), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def header_only(fmt: str, width: int, height: int) -> bytes:
    """Just the header of a format, declaring width x height, and some bytes after it."""
    pad = b"\x00" * 256
    if fmt == "BMP":
        return b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHH", 40, width, height, 1, 24) + pad
    if fmt == "GIF":
        return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + pad
    if fmt == "WebP":
        canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        return b"RIFF" + struct.pack("<I", 200) + b"WEBPVP8X" + struct.pack("<I", 10) + b"\x00" * 4 + canvas + pad
    if fmt == "TIFF":
        entries = struct.pack("<HHII", 256, 4, 1, width) + struct.pack("<HHII", 257, 4, 1, height)
        return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + b"\x00" * 4 + pad
    if fmt == "JPEG":
        return jpeg_declaring(width, height)
    raise ValueError(fmt)


@cache
def strip_png() -> bytes:
    """The issue's upload: 1 x 39,000,000 pixels in 76 kB, seconds of CPU to decode."""
    return sparse_png(1, 39_000_000)


OVERSIZED = {
    "png-1x39000000": (strip_png, "side"),
    "png-2000x40-aspect": (lambda: sparse_png(2000, 40), "aspect ratio"),
    "jpeg-65000x65000": (lambda: header_only("JPEG", 65000, 65000), "side"),
    "jpeg-16000x100": (lambda: header_only("JPEG", 16000, 100), "aspect ratio"),
    "bmp-100000x1": (lambda: header_only("BMP", 100000, 1), "side"),
    "gif-65535x2": (lambda: header_only("GIF", 65535, 2), "side"),
    "webp-16384x1": (lambda: header_only("WebP", 16384, 1), "aspect ratio"),
    "tiff-1x100000": (lambda: header_only("TIFF", 1, 100000), "side"),
}


@pytest.mark.parametrize("case", list(OVERSIZED))
def test_sides_and_aspect_ratio_are_refused_from_the_header(http: httpx.Client, case: str) -> None:
    make, words = OVERSIZED[case]
    data = make()
    one = http.post("/predict", files={"file": (case, data, "image/png")})
    raw = http.post("/v1/caption", content=data, headers={"content-type": "image/png"})
    many = http.post("/predicts", files=[("files", (f"{i}-{case}", data, "image/png")) for i in range(16)])
    for answer in (one, raw, many):
        detail = answer.json()["detail"]
        assert answer.status_code == 422 and words in detail and "limit" in detail, detail
    assert one.json()["detail"].startswith(f"{case}: ") and many.json()["detail"].startswith(f"0-{case}: ")


# ---------------------------------------------------------------- slow clients


def app_address(app: App) -> tuple[str, int]:
    parts = urlsplit(app.server.base_url)
    return parts.hostname or "127.0.0.1", int(parts.port or 80)


def stalled_request(address: tuple[str, int], path: str, content_type: str, declared: int, sent: bytes
                    ) -> tuple[int, dict[str, str], bytes, bool]:
    """Send the head and part of a body, then nothing: the status, headers and body of the answer, and whether the
    server closed the connection after it."""
    with socket.create_connection(address, timeout=60) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {declared}\r\n\r\n").encode()
        sock.sendall(head + sent)
        answer = HTTPResponse(sock)
        answer.begin()
        body = answer.read()
        closed = sock.recv(1) == b""  # blocks until the server closes (or the 60 s socket timeout)
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, body, closed


STALLED_BODIES = (("/v1/caption", "image/png"), ("/v1/caption", "application/json"),
                  ("/predict", "multipart/form-data; boundary=x"))


def test_stalled_body_gets_408_and_the_connection_closes(app: App) -> None:
    """Each body kind stalls on its own connection, all at once (each waits out the body timeout)."""
    address = app_address(app)
    with ThreadPoolExecutor(len(STALLED_BODIES)) as pool:
        answers = list(pool.map(lambda kind: stalled_request(address, kind[0], kind[1], 100_000, b"0" * 1000),
                                STALLED_BODIES))
    for (path, content_type), (status, headers, body, closed) in zip(STALLED_BODIES, answers):
        assert status == 408 and headers["connection"] == "close" and closed, (path, content_type, status)
        detail = json.loads(body)["detail"]
        assert f"within {BODY_TIMEOUT_S} s" in detail and "1000 bytes" in detail, (path, content_type, detail)


def test_connection_limit_answers_503_and_recovers(module_checkpoint: Path, blip_dir: Path) -> None:
    """The documented production flags: --limit-concurrency bounds open connections (slowloris sockets count)."""
    args = ("--limit-concurrency", "4", "--timeout-keep-alive", "1")
    with start_app("api", module_checkpoint, blip_dir, {}, "limits", extra_args=args) as server:
        address = app_address(App("api", server, "CAPTION", ()))
        loris = [socket.create_connection(address, timeout=30) for _ in range(4)]
        for sock in loris:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: ")  # headers never end
        with server.client(timeout=30) as client:
            refused = wait_for_status(client, "/health", 503)  # once the server has taken the 4 sockets
            for sock in loris:
                sock.close()
            recovered = wait_for_status(client, "/health", 200)
        with socket.create_connection(address, timeout=30) as idle:  # keep-alive ends after 1 s idle
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            answer = HTTPResponse(idle)
            answer.begin()
            answer.read()
            idle_closed = idle.recv(1) == b""
    assert refused.status_code == 503 and recovered.status_code == 200 and idle_closed


def wait_for_status(client: httpx.Client, path: str, status: int, timeout_s: float = 120.0) -> httpx.Response:
    """GET path until it answers ``status`` (or, when a hung server never does, the last answer after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = client.get(path)
        if answer.status_code == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


# ---------------------------------------------------------------- deadlines and a hung model


@pytest.mark.parametrize("name", ["api", "blip"])
def test_request_past_its_deadline_gets_504(module_checkpoint: Path, blip_dir: Path, name: str) -> None:
    """A batch waits 2 s for company but a request's deadline is 0.3 s: it gets a JSON 504, the server goes on."""
    settings = {"MAX_WAIT_MS": "2000", "MODEL_TIMEOUT_S": "0.3"}
    prefix = "CAPTION" if name == "api" else "BLIP"
    with (start_app(name, module_checkpoint, blip_dir, settings, "deadline") as server,
          server.client(timeout=60) as client):
        late = client.post("/predict", files={"file": ("a.png", PNG, "image/png")})
        health = client.get("/health")
    assert late.status_code == 504 and f"{prefix}_MODEL_TIMEOUT_S" in late.json()["detail"]
    assert "retry-after" in late.headers and health.json() == {"status": "ok"}


class HangingBackend:
    """Captions at once, except images 13 pixels wide: those hang the model thread until ``release`` is set."""

    max_len = 20

    def __init__(self) -> None:
        self.release = threading.Event()

    def info(self) -> dict[str, str]:
        return {"backend": "hanging", "name": "hanging", "kind": "test"}

    def check_params(self, params: CaptionParams) -> None:
        pass

    def caption_batch(self, images: list[Image.Image], params: CaptionParams) -> list[list[tuple[str, float]]]:
        if any(image.size[0] == 13 for image in images):
            self.release.wait(timeout=300)
        return [[("a caption", -1.0)] * params.num_captions for _ in images]


def test_hung_model_gives_504_and_health_says_stuck_while_the_server_answers() -> None:
    backend = HangingBackend()
    app = create_app(lambda: backend, ServingSettings(max_wait_ms=1, model_timeout_s=1.0), title="hanging")
    hang = image_bytes((13, 13))
    try:
        with server_in_thread(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
            hung = client.post("/predict", files={"file": ("hang.png", hang, "image/png")})
            stuck = wait_for_status(client, "/health", 503)
            queued = client.post("/predict", files={"file": ("a.png", PNG, "image/png")})
            ready = client.get("/ready")
            refused = client.post("/predict", files={"file": ("a.eps", eps(), "image/png")})
            backend.release.set()
            healthy = wait_for_status(client, "/health", 200)
            after = client.post("/predict", files={"file": ("a.png", PNG, "image/png")})
    finally:
        backend.release.set()
    assert hung.status_code == 504 and "did not answer within 1 s" in hung.json()["detail"]
    assert stuck.status_code == 503 and stuck.json()["status"] == "model_stuck"
    assert "model thread" in stuck.json()["detail"] and "retry-after" in stuck.headers
    assert queued.status_code == 504 and ready.status_code == 200 and refused.status_code == 415
    assert healthy.json() == {"status": "ok"} and after.status_code == 200 and after.json()["caption"] == "a caption"


# ---------------------------------------------------------------- /captioned downloads get the same checks


@pytest.fixture(scope="module")
def image_server() -> Iterator[int]:
    with file_server({"/photo.png": PNG, "/figure.eps": eps(), "/strip.png": strip_png()}) as server:
        yield server.port


def test_captioned_downloads_get_the_format_and_side_checks(image_server: int) -> None:
    app = create_app(lambda: HangingBackend(), ServingSettings(max_wait_ms=1), title="t",
                     url_fetcher=pinned_fetcher())
    answers = {}
    with server_in_thread(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        for name in ("photo.png", "figure.eps", "strip.png"):
            url = f"http://images.test:{image_server}/{name}"
            answers[name] = client.post("/captioned", json={"imageUrl": url, "imageName": name})
    assert answers["photo.png"].status_code == 200
    assert answers["figure.eps"].status_code == 415 and "EPS" in answers["figure.eps"].json()["detail"]
    assert answers["strip.png"].status_code == 422 and "side" in answers["strip.png"].json()["detail"]


def test_burst_of_hostile_and_good_uploads_never_500(http: httpx.Client, app: App) -> None:
    """Every hostile body above at once, with good requests among them: each gets its 4xx, the good ones 200."""
    hostile: list[Callable[[httpx.AsyncClient], Any]] = [
        lambda c: c.post("/predict", files={"file": ("s.png", strip_png(), "image/png")}),
        lambda c: c.post("/v1/caption", content=NON_STRICT_JSON["infinity"],
                         headers={"content-type": "application/json"}),
        lambda c: c.post("/v1/caption", content=eps(), headers={"content-type": "image/png"}),
        lambda c: c.post("/predict", files={"file": ("a.jpg", JPEG, "image/jpeg")}),
    ]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=app.server.base_url, timeout=120.0) as client:
            return await asyncio.gather(*(hostile[i % len(hostile)](client) for i in range(32)))

    answers = asyncio.run(burst())
    for answer in answers:
        check_answer(answer, app.secrets)
    assert [a.status_code for a in answers[:4]] == [422, 422, 415, 200]
    assert {a.status_code for a in answers} <= {200, 415, 422, 503}
