"""Helpers for tests and benchmarks: run a real uvicorn server (a subprocess, or a thread for an app built in the
test), talk to it with every answer checked, serve files over plain HTTP (images to fetch), make small test images."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def image_bytes(size: tuple[int, int] = (48, 32), fmt: str = "PNG", mode: str = "RGB",
                color: int | tuple[int, ...] = (200, 30, 30), **save_kwargs: object) -> bytes:
    """An encoded image of one colour with a contrasting square, so that captions can differ between images."""
    image = Image.new(mode, size, color)
    if mode in ("RGB", "RGBA"):
        image.paste((20, 20, 220) + ((255,) if mode == "RGBA" else ()), (0, 0, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def sparse_png(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG whose pixels compress to almost nothing: a decompression bomb (20,000 x 20,000) or a
    strip (1 x 39,000,000: 76 kB, seconds of CPU to decode) in tens of kilobytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows_per_piece = max(1, 1_000_000 // (2 + width // 8))
    piece = (b"\0" * (1 + (width + 7) // 8)) * rows_per_piece
    packer = zlib.compressobj(9)
    full, rest = divmod(height, rows_per_piece)
    idat = b"".join(packer.compress(piece) for _ in range(full))
    idat += packer.compress(piece[:rest * (1 + (width + 7) // 8)]) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    """A uvicorn subprocess: its base URL (or UDS path), process and log file."""

    base_url: str
    process: subprocess.Popen
    log_path: Path
    uds: Path | None = None

    def client(self, **kwargs: object) -> httpx.Client:
        """An httpx client for this server (UDS transport when it listens on a socket file)."""
        if self.uds is not None:
            kwargs.setdefault("transport", httpx.HTTPTransport(uds=str(self.uds)))
        return httpx.Client(base_url=self.base_url, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def checked_client(server: RunningServer, check: Callable[[httpx.Response], None], timeout: float = 60.0
                   ) -> Iterator[httpx.Client]:
    """A client of the server whose every answer goes through ``check``; on exit the server must still be healthy."""
    with server.client(timeout=timeout, event_hooks={"response": [check]}) as client:
        yield client
        assert client.get("/health").json() == {"status": "ok"}


@contextmanager
def uvicorn_server(app: str, env: Mapping[str, str], log_path: Path, *, app_dir: Path = ROOT, cwd: Path | None = None,
                   uds: Path | None = None, workers: int = 1, startup_timeout_s: float = 600.0,
                   extra_args: Sequence[str] = (), wait_for: str = "/ready") -> Iterator[RunningServer]:
    """Start ``python -m uvicorn app`` on a free 127.0.0.1 port (or ``uds``), wait until ``wait_for`` (/ready: the
    model is loaded; /health: the port is open) answers 200 (failing at once if the process exits or its model
    fails to load; the limit only ends a hung start, a loaded machine may take minutes), stop it (SIGTERM, then
    SIGKILL) on exit. Environment: the current one, HF offline, plus ``env``; ``extra_args`` go to uvicorn (e.g.
    ``--limit-concurrency 8``)."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--app-dir", str(app_dir), "--workers", str(workers),
               "--log-level", "warning", *extra_args]
    command += ["--uds", str(uds)] if uds is not None else ["--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=full_env, cwd=cwd or app_dir, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer("http://127.0.0.1" if uds else f"http://127.0.0.1:{port}", process, log_path, uds)
    try:
        _wait_ready(server, startup_timeout_s, wait_for)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_ready(server: RunningServer, timeout_s: float, path: str = "/ready") -> None:
    """Poll ``path``; fail with the server log if the process exits, its model fails to load or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"uvicorn exited with code {server.process.returncode}:\n{server.log()}")
        if server.uds is None or server.uds.exists():
            try:
                with server.client(timeout=2.0) as client:
                    if client.get(path).status_code == 200:
                        return
                    _raise_if_load_failed(client.get("/health"), server.log)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"uvicorn did not become ready within {timeout_s:g} s:\n{server.log()}")


def _raise_if_load_failed(health: httpx.Response, log: Callable[[], str]) -> None:
    """RuntimeError with the server's log when /health says the model failed to load."""
    if health.status_code == 503 and health.json().get("status") == "load_failed":
        raise RuntimeError(f"the model failed to load: {health.json()['detail']}\n{log()}")


@contextmanager
def ready_client(app: object, startup_timeout_s: float = 600.0) -> Iterator[TestClient]:
    """A started in-process TestClient of an app once its model is loaded (the load runs in the background after
    start-up): /ready answers 200. A failed load raises RuntimeError; the limit only ends a hung load."""
    with TestClient(app) as client:  # type: ignore[arg-type]
        deadline = time.monotonic() + startup_timeout_s
        while client.get("/ready").status_code != 200:
            _raise_if_load_failed(client.get("/health"), lambda: "")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the model did not load within {startup_timeout_s:g} s")
            time.sleep(0.02)
        yield client


@contextmanager
def server_in_thread(app: object, startup_timeout_s: float = 600.0, **config: object) -> Iterator[str]:
    """Serve an app object built in this process (a fake model, a pinned URL fetcher) with uvicorn on a free
    127.0.0.1 port, in a thread; yields the base URL once /ready answers 200. ``config`` goes to uvicorn.Config."""
    import uvicorn

    port = free_port()
    settings: dict[str, object] = {"host": "127.0.0.1", "port": port, "log_level": "warning", **config}
    server = uvicorn.Server(uvicorn.Config(app, **settings))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _answers_ready(base_url):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the in-process uvicorn server did not become ready within {startup_timeout_s:g} s")
            time.sleep(0.05)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _answers_ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/ready", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class Answer:
    """What a file_server path answers: a status, a body and headers, after a delay."""

    body: bytes = b""
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class FileServer:
    """A running file_server: its port, and the Host header of every request it got, in order."""

    port: int
    hosts: list[str]


@contextmanager
def file_server(answers: Mapping[str, bytes | Answer]) -> Iterator[FileServer]:
    """A plain HTTP server on a free 127.0.0.1 port, in threads: GET path answers ``answers[path]`` (bytes: 200 with
    that body), any other path 404."""
    hosts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            hosts.append(self.headers.get("Host", ""))
            answer = answers.get(self.path, Answer(b"no", 404))
            answer = Answer(answer) if isinstance(answer, bytes) else answer
            time.sleep(answer.delay_s)
            self.send_response(answer.status)
            for key, value in {"Content-Length": str(len(answer.body)), **answer.headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, name="test-file-server", daemon=True).start()
    try:
        yield FileServer(int(server.server_address[1]), hosts)
    finally:
        server.shutdown()
        server.server_close()
