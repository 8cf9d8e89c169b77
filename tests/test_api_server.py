"""A real uvicorn server (subprocess, real HTTP) fed bad inputs, a burst of concurrent requests and a Unix socket;
its port opens before the model loads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from processes import wait_while_progressing

import api
from serving import Backend
from serving.testing import RunningServer, checked_client, image_bytes, sparse_png, uvicorn_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BODY_LIMIT = 300_000
JPEG = image_bytes((64, 48), "JPEG")


def png_bomb() -> bytes:
    """A valid 1-bit PNG of 20,000 x 20,000 black pixels: 400 megapixels in a few tens of kilobytes."""
    return sparse_png(20_000, 20_000)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's working directory: it must still be empty at the end (uploads never reach the disk)."""
    return tmp_path_factory.mktemp("server-cwd") / "a" / "b"


@pytest.fixture(scope="module")
def server(module_checkpoint: Path, workdir: Path) -> Iterator[RunningServer]:
    """One uvicorn server for the module: small queue, small body limit, URL fetching on for loopback hosts."""
    workdir.mkdir(parents=True)
    env = {"CAPTION_CHECKPOINT": str(module_checkpoint), "CAPTION_QUEUE_SIZE": "4", "CAPTION_MAX_BATCH_SIZE": "2",
           "CAPTION_MAX_WAIT_MS": "2", "CAPTION_MAX_BODY_BYTES": str(BODY_LIMIT), "CAPTION_RETRY_AFTER_S": "2",
           "CAPTION_URL_FETCH": "1", "CAPTION_URL_ALLOWLIST": "127.0.0.1,localhost", "CAPTION_URL_TIMEOUT_S": "3"}
    with uvicorn_server("api:app", env, ROOT / "test-artifacts" / "api_server.log", cwd=workdir) as running:
        yield running
        log = running.log()
    assert "Traceback" not in log, log


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    """A client whose every answer is checked: JSON errors, no 500, and still healthy afterwards."""
    with checked_client(server, _check_answer) as client:
        yield client


def _check_answer(response: httpx.Response) -> None:
    response.read()
    assert response.status_code < 500 or response.status_code == 503, response.text
    if response.status_code == 503:
        assert response.headers.get("retry-after") == "2"
    if response.status_code >= 400:
        assert "detail" in response.json()


def test_server_answers_every_endpoint(http: httpx.Client) -> None:
    assert http.get("/ready").json()["status"] == "ready"
    assert http.post("/predict", files={"file": ("a.jpg", JPEG, "image/jpeg")}).json()["caption"]
    many = http.post("/predicts?beam_size=2", files=[("files", ("a.jpg", JPEG, "image/jpeg"))] * 3).json()
    assert [item["filename"] for item in many] == ["a.jpg"] * 3
    assert http.post("/v1/caption", content=JPEG, headers={"content-type": "image/jpeg"}).json()[0]["generated_text"]
    assert "<input" in http.get("/").text and http.get("/docs").status_code == 200


@pytest.mark.parametrize(("name", "data", "kind", "status"), [
    ("empty.jpg", b"", "image/jpeg", 422),
    ("notes.txt", b"just some text\n" * 20, "text/plain", 415),
    ("truncated.jpg", image_bytes((256, 256), "JPEG")[:1500], "image/jpeg", 422),
    ("bomb.png", png_bomb(), "image/png", 422),
])
def test_server_bad_images_refused(http: httpx.Client, name: str, data: bytes, kind: str, status: int) -> None:
    for answer in (http.post("/predict", files={"file": (name, data, kind)}),
                   http.post("/v1/caption", content=data, headers={"content-type": "image/png"})):
        assert answer.status_code == status, answer.text
    assert len(data) < 100_000


def test_server_bomb_message_names_the_pixel_limit(http: httpx.Client) -> None:
    answer = http.post("/predict", files={"file": ("bomb.png", png_bomb(), "image/png")})
    assert answer.status_code == 422 and "bomb.png" in answer.json()["detail"] and "limit" in answer.json()["detail"]


def test_server_upload_above_size_limit_413(http: httpx.Client) -> None:
    blob = bytes(range(256)) * (BODY_LIMIT // 256 + 50)
    assert http.post("/predict", files={"file": ("big.jpg", blob, "image/jpeg")}).status_code == 413
    assert http.post("/v1/caption", content=blob, headers={"content-type": "image/jpeg"}).status_code == 413
    chunked = http.post("/v1/caption", content=iter([blob[:100_000], blob[100_000:]]),
                        headers={"content-type": "image/jpeg"})
    assert chunked.status_code == 413


def test_server_path_traversal_file_name_writes_nothing(http: httpx.Client, workdir: Path) -> None:
    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    answer = http.post("/predicts", files=[("files", ("../../etc/passwd.jpg", JPEG, "image/jpeg"))])
    assert answer.status_code == 200 and answer.json()[0]["filename"] == "../../etc/passwd.jpg"
    assert http.post("/predict", files={"file": ("../../etc/passwd.jpg", JPEG, "image/jpeg")}).status_code == 200
    assert list(workdir.iterdir()) == [] and not (workdir / "../../etc/passwd.jpg").exists()
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd


@pytest.mark.parametrize(("path", "kwargs"), [
    ("/predict?beam=3", {"files": {"file": ("a.jpg", JPEG, "image/jpeg")}}),
    ("/predicts?top_k=3", {"files": {"files": ("a.jpg", JPEG, "image/jpeg")}}),
    ("/v1/caption?num_beams=2&temperature=0.7", {"content": JPEG, "headers": {"content-type": "image/jpeg"}}),
    ("/v1/caption", {"json": {"inputs": "aGk=", "parameters": {"top_p": 0.9}}}),
    ("/captioned", {"json": {"imageUrl": "http://127.0.0.1/x.jpg", "imageName": "x", "timeout": 1}}),
    ("/predict?beam_size=99", {"files": {"file": ("a.jpg", JPEG, "image/jpeg")}}),
])
def test_server_unknown_or_out_of_range_parameters_422(http: httpx.Client, path: str, kwargs: dict) -> None:
    assert http.post(path, **kwargs).status_code == 422


@pytest.mark.parametrize(("url", "status"), [
    ("http://127.0.0.1:{port}/health", 403),
    ("http://localhost:{port}/ready", 403),
    ("http://[::1]:{port}/health", 403),
    ("file:///etc/passwd", 422),
    ("gopher://127.0.0.1:{port}/_GET%20/health", 422),
    ("ftp://127.0.0.1/x.jpg", 422),
])
def test_server_captioned_refuses_loopback_and_other_schemes(http: httpx.Client, server: RunningServer, url: str,
                                                             status: int) -> None:
    port = server.base_url.rsplit(":", 1)[1]
    answer = http.post("/captioned", json={"imageUrl": url.format(port=port), "imageName": "x"})
    assert answer.status_code == status, answer.text


def test_server_burst_of_64_requests_gets_200_or_503(http: httpx.Client, server: RunningServer) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120.0,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post("/predict?beam_size=8&max_len=23",
                                                      files={"file": (f"{i}.jpg", JPEG, "image/jpeg")})
                                          for i in range(64)))

    answers = asyncio.run(burst())
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) == {200, 503}, statuses
    for answer in answers:
        _check_answer(answer)
    assert all(answer.json()["caption"] for answer in answers if answer.status_code == 200)
    assert http.post("/predict", files={"file": ("after.jpg", JPEG, "image/jpeg")}).status_code == 200


def gated_app() -> FastAPI:
    """api.py's app whose model load first waits until the file named by $GATE_FILE exists: a load exactly as slow as
    the test needs (``uvicorn test_api_server:gated_app --factory``)."""
    gate, load = Path(os.environ["GATE_FILE"]), api.load_backend

    def load_when_opened(model: Mapping[str, str | None]) -> Backend:
        while not gate.exists():
            time.sleep(0.05)
        return load(model)

    api.load_backend = load_when_opened  # build_app's loader looks the name up when it runs
    return api.build_app()


def test_server_opens_its_port_before_the_model_loads_and_ready_is_503_until_it_has(module_checkpoint: Path,
                                                                                   tmp_path: Path) -> None:
    gate = tmp_path / "load-now"
    env = {"CAPTION_CHECKPOINT": str(module_checkpoint), "GATE_FILE": str(gate), "PYTHONPATH": str(ROOT)}
    log = ROOT / "test-artifacts" / "api_gated_load.log"
    with (uvicorn_server("test_api_server:gated_app", env, log, app_dir=ROOT / "tests", cwd=ROOT,
                         extra_args=("--factory",), wait_for="/health") as server,
          server.client(timeout=60.0) as client):
        health, loading = client.get("/health"), client.get("/ready")  # the load is held until the gate opens
        gate.touch()
        assert wait_while_progressing(lambda: client.get("/ready").status_code == 200, server.process, [])
        ready = client.get("/ready")
        answer = client.post("/predict", files={"file": ("a.jpg", JPEG, "image/jpeg")})
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert loading.status_code == 503 and loading.headers["retry-after"] == "1"
    assert loading.json() == {"detail": "the model is loading, retry later"}
    assert ready.json()["status"] == "ready" and answer.status_code == 200 and answer.json()["caption"]


def test_server_unix_socket_mode_with_two_workers(module_checkpoint: Path, tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    env = {"CAPTION_CHECKPOINT": str(module_checkpoint)}
    log = ROOT / "test-artifacts" / "api_uds.log"
    with uvicorn_server("api:app", env, log, uds=socket_path, workers=2) as running:
        with running.client(timeout=60.0) as client:
            assert client.get("/health").json() == {"status": "ok"}
            answer = client.post("/predict?num_captions=2&beam_size=2", files={"file": ("a.jpg", JPEG, "image/jpeg")})
    assert answer.status_code == 200 and len(answer.json()["captions"]) == 2
