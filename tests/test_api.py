"""Contract tests of api.py and the shared serving package, in process (TestClient) with a real tiny checkpoint."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from processes import run_watched

import api
from serving import (
    CaptionParams,
    MicroBatcher,
    ServingSettings,
    SettingsError,
    UrlFetcher,
    UrlFetchError,
    create_app,
    load_settings,
)
from serving.testing import Answer, FileServer, file_server, image_bytes, ready_client
from serving.urlguard import host_allowed, is_public_address
from utils.checkpoint import load_checkpoint_file, state_dict_sha256
from utils.runtime import resolve_device

ROOT = Path(__file__).resolve().parents[1]
PNG = image_bytes()


def png_file(name: str = "a.png", data: bytes = PNG) -> tuple[str, bytes, str]:
    return (name, data, "image/png")


@pytest.fixture
def client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    """api.py's app for the tiny checkpoint, started (lifespan run)."""
    app = api.build_app(environ={"CAPTION_CHECKPOINT": str(tiny_checkpoint), "CAPTION_MAX_WAIT_MS": "1"})
    with ready_client(app) as test_client:
        yield test_client


class FakeBackend:
    """Captions that describe the image (size and first pixel), recording every model call."""

    max_len = 30

    def __init__(self, fail_when_width: int | None = None, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[int, CaptionParams]] = []
        self.threads: set[str] = set()
        self.fail_when_width = fail_when_width
        self.gate = gate

    def info(self) -> dict[str, str]:
        return {"backend": "fake"}

    def check_params(self, params: CaptionParams) -> None:
        pass

    def caption_batch(self, images: Sequence[Image.Image], params: CaptionParams) -> list[list[tuple[str, float]]]:
        self.calls.append((len(images), params))
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if any(image.size[0] == self.fail_when_width for image in images):
            raise RuntimeError("model exploded")
        return [[(f"{im.mode} {im.size[0]}x{im.size[1]} {im.getpixel((im.size[0] - 1, im.size[1] - 1))}", -1.0 - i)
                 for i in range(params.num_captions)] for im in images]


@contextmanager
def fake_client(backend: FakeBackend, **settings: object) -> Iterator[TestClient]:
    app = create_app(lambda: backend, ServingSettings(**{"max_wait_ms": 1.0, **settings}), title="fake")
    with ready_client(app) as client:
        yield client


# ---------------------------------------------------------------- api.py: app object, health, readiness, docs


def test_api_import_loads_no_model() -> None:
    code = ("import sys, api; assert api.app.state.serving.backend is None; "
            "loaded = {'captioner', 'models', 'deploy.checkpoints'} & set(sys.modules); assert not loaded, loaded")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = run_watched([sys.executable, "-c", code], cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr


def test_api_ready_503_until_loaded_then_model_info(tiny_checkpoint: Path) -> None:
    app = api.build_app(environ={"CAPTION_CHECKPOINT": str(tiny_checkpoint)})
    not_started = TestClient(app)
    answer = not_started.get("/ready")
    assert answer.status_code == 503 and "Retry-After" in answer.headers and "detail" in answer.json()
    assert not_started.post("/predict", files={"file": png_file()}).status_code == 503
    with ready_client(app) as started:
        info = started.get("/ready").json()
    assert info["status"] == "ready" and info["model"]["backend"] == "expansionnet"
    assert info["model"]["name"] == "optimizer_expansionnet" and info["limits"]["max_len_limit"] == 23  # 24 - SOS
    assert info["model"]["kind"] == "torch" and info["model"]["parameters"] > 1000  # backend auto, a checkpoint
    assert info["model"]["weights_sha256"] == state_dict_sha256(load_checkpoint_file(tiny_checkpoint)[
        "model_state_dict"])
    assert "checkpoint" not in info["model"] and str(tiny_checkpoint.parent) not in json.dumps(info)


def test_api_serves_an_ensemble_of_checkpoints_on_the_chosen_backend(tiny_checkpoint: Path, tmp_path: Path) -> None:
    second = tmp_path / "second.pth"
    second.write_bytes(tiny_checkpoint.read_bytes())
    config = tmp_path / "api.json"
    config.write_text(json.dumps({"CAPTION_CHECKPOINT": [str(tiny_checkpoint), "second.pth"],
                                  "CAPTION_BACKEND": "torch"}))
    app = api.build_app(environ={"CAPTION_API_CONFIG": str(config)})
    with ready_client(app) as client:
        info = client.get("/ready").json()["model"]
        answer = client.post("/predict", files={"file": png_file()}, params={"beam_size": 2, "max_len": 5})
    assert info["kind"] == "ensemble" and info["members"] == 2
    assert answer.status_code == 200 and isinstance(answer.json()["caption"], str)


def test_api_startup_fails_clearly_without_checkpoint(tmp_path: Path) -> None:
    app = api.build_app(environ={})
    with pytest.raises(RuntimeError, match="CAPTION_CHECKPOINT is not set"), TestClient(app):
        pass
    missing = api.build_app(environ={"CAPTION_CHECKPOINT": str(tmp_path / "nowhere.pth")})
    with pytest.raises(RuntimeError, match="CAPTION_CHECKPOINT: .*nowhere.pth does not exist"), TestClient(missing):
        pass


def test_api_defaults_decode_like_demo_and_test(client: TestClient) -> None:
    info = client.get("/ready").json()
    # the model's full length (max_seq_len 24 - SOS), as demo.py and test.py decode (utils.cli.resolve_max_len)
    assert info["defaults"] == {"beam_size": 5, "max_len": 23, "num_captions": 1}
    assert api.MODEL_KEYS["DEVICE"] == "auto" and info["model"]["device"].startswith(resolve_device("auto").type)
    assert not info["repetition_controls"]


def test_app_loads_the_model_after_start_up_health_at_once_ready_503_until_loaded() -> None:
    gate = threading.Event()

    def slow_load() -> FakeBackend:
        gate.wait(timeout=300)
        return FakeBackend()

    app = create_app(slow_load, ServingSettings(max_wait_ms=1.0, model_timeout_s=0.2, retry_after_s=3), title="slow")
    try:
        with TestClient(app) as client:
            health, ready = client.get("/health"), client.get("/ready")
            during = client.post("/predict", files={"file": png_file()})  # waits up to its deadline, then 503
            gate.set()
            _wait_for(lambda: client.get("/ready").status_code == 200)
            after = client.post("/predict", files={"file": png_file()})
    finally:
        gate.set()
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 503 and ready.json()["detail"] == "the model is loading, retry later"
    assert during.status_code == 503 and during.headers["retry-after"] == "3" and "loading" in during.json()["detail"]
    assert after.status_code == 200 and after.json()["caption"].startswith("RGB 48x32")


def test_app_model_that_fails_to_load_makes_health_and_ready_503_without_its_paths() -> None:
    def broken_load() -> FakeBackend:
        raise OSError("cannot read /secret/models/best.pth")

    with TestClient(create_app(broken_load, ServingSettings(), title="broken")) as client:
        _wait_for(lambda: client.get("/health").status_code == 503)
        health, ready = client.get("/health"), client.get("/ready")
        refused = client.post("/predict", files={"file": png_file()})
    assert health.json()["status"] == "load_failed" and "OSError" in health.json()["detail"]
    assert ready.status_code == refused.status_code == 503 and "failed to load" in ready.json()["detail"]
    assert all("/secret" not in answer.text for answer in (health, ready, refused))


def test_api_health_ok(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_api_openapi_docs_list_every_endpoint_that_can_answer(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/predicts", "/v1/caption", "/health", "/ready"} <= set(paths)
    assert "/captioned" not in paths  # URL fetching is off by default: it only answers 403
    assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]
    assert {p["name"] for p in paths["/predict"]["post"]["parameters"]} >= {"beam_size", "max_len", "num_captions"}


def test_api_index_page_is_mobile_friendly_and_self_contained(client: TestClient) -> None:
    answer = client.get("/")
    page = answer.text
    script = client.get("/app.js")
    style = client.get("/app.css")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    assert '<meta name="viewport"' in page and 'accept="image/*"' in page and 'capture="environment"' in page
    assert '<link rel="manifest" href="manifest.webmanifest">' in page and '<script src="app.js"' in page
    assert script.headers["content-type"].startswith("text/javascript") and "v1/caption" in script.text
    assert style.headers["content-type"].startswith("text/css") and "@media" in style.text
    for text in (page, script.text, style.text):
        assert "http://" not in text and "https://" not in text  # no CDN: everything comes from this server
    csp = answer.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp


# ---------------------------------------------------------------- /predict and /predicts


def test_predict_returns_caption_and_score(client: TestClient) -> None:
    answer = client.post("/predict", files={"file": png_file()})
    assert answer.status_code == 200
    body = answer.json()
    assert isinstance(body["caption"], str) and body["caption"]
    assert isinstance(body["score"], float) and body["captions"][0] == {"caption": body["caption"],
                                                                         "score": body["score"]}


def test_predict_query_params_give_num_captions_best_first(client: TestClient) -> None:
    answer = client.post("/predict?beam_size=3&num_captions=3&max_len=6", files={"file": png_file()})
    assert answer.status_code == 200
    captions = answer.json()["captions"]
    assert len(captions) == 3
    assert [c["score"] for c in captions] == sorted((c["score"] for c in captions), reverse=True)
    assert all(len(c["caption"].split()) <= 6 for c in captions)


@pytest.mark.parametrize("query", ["beam_size=0", "beam_size=11", "max_len=0", "max_len=24", "beam_size=two",
                                   "num_captions=4&beam_size=3", "num_captions=0"])
def test_predict_out_of_bounds_params_422(client: TestClient, query: str) -> None:
    answer = client.post(f"/predict?{query}", files={"file": png_file()})
    assert answer.status_code == 422 and "detail" in answer.json()


def test_predict_unknown_query_parameter_422(client: TestClient) -> None:
    answer = client.post("/predict?beam_size=2&temperature=0.5", files={"file": png_file()})
    assert answer.status_code == 422 and "temperature" in answer.json()["detail"]


def test_predict_repetition_controls_unsupported_by_expansionnet_422(client: TestClient) -> None:
    answer = client.post("/predict?repetition_penalty=1.5", files={"file": png_file()})
    assert answer.status_code == 422 and "not supported" in answer.json()["detail"]


def test_predict_form_errors_are_json(client: TestClient) -> None:
    missing = client.post("/predict", files={"image": png_file()})
    extra = client.post("/predict", files={"file": png_file()}, data={"beam_size": "3"})
    two = client.post("/predict", files=[("file", png_file()), ("file", png_file())])
    not_form = client.post("/predict", content=PNG, headers={"content-type": "image/png"})
    assert missing.status_code == 422 and "image" in missing.json()["detail"]
    assert extra.status_code == 422 and "beam_size" in extra.json()["detail"]
    assert two.status_code == 422 and "too many files" in two.json()["detail"]
    assert not_form.status_code == 415 and "multipart" in not_form.json()["detail"]


@pytest.mark.parametrize("name", ["empty.png", "truncated.jpg", "header-only.gif"])
def test_predict_bad_image_422_names_the_problem(client: TestClient, name: str) -> None:
    data = {"empty.png": b"", "truncated.jpg": image_bytes((64, 64), "JPEG")[:300], "header-only.gif": b"GIF89a"}[name]
    answer = client.post("/predict", files={"file": (name, data, "image/jpeg")})
    assert answer.status_code == 422
    assert name in answer.json()["detail"]


def test_predict_data_in_no_accepted_format_415_lists_the_formats(client: TestClient) -> None:
    answer = client.post("/predict", files={"file": ("text.png", b"hello, not an image", "image/png")})
    detail = answer.json()["detail"]
    assert answer.status_code == 415 and "JPEG, PNG, WebP, GIF, BMP, TIFF" in detail
    assert detail.startswith("text.png: not an image in an accepted format; ")


def test_predicts_returns_one_entry_per_file_in_order(client: TestClient) -> None:
    files = [("files", png_file("one.png")), ("files", png_file("two.jpg", image_bytes(fmt="JPEG"))),
             ("files", png_file("../../etc/passwd.jpg"))]
    answer = client.post("/predicts?num_captions=2&beam_size=2", files=files)
    assert answer.status_code == 200
    body = answer.json()
    assert [item["filename"] for item in body] == ["one.png", "two.jpg", "../../etc/passwd.jpg"]
    assert all(len(item["captions"]) == 2 and item["caption"] == item["captions"][0]["caption"] for item in body)


def test_predicts_too_many_files_422(tiny_checkpoint: Path) -> None:
    app = api.build_app(environ={"CAPTION_CHECKPOINT": str(tiny_checkpoint), "CAPTION_MAX_FILES": "2"})
    with TestClient(app) as client:
        answer = client.post("/predicts", files=[("files", png_file(f"{i}.png")) for i in range(3)])
    assert answer.status_code == 422 and "at most 2" in answer.json()["detail"]


def test_predicts_bad_file_is_named(client: TestClient) -> None:
    answer = client.post("/predicts", files=[("files", png_file("good.png")), ("files", ("bad.gif", b"GIF89a", "x"))])
    assert answer.status_code == 422 and "bad.gif" in answer.json()["detail"]


# ---------------------------------------------------------------- /v1/caption (Hugging Face convention)


def test_v1_caption_accepts_raw_multipart_and_json(client: TestClient) -> None:
    raw = client.post("/v1/caption", content=PNG, headers={"content-type": "image/png"})
    form = client.post("/v1/caption", files={"file": png_file()})
    as_json = client.post("/v1/caption", json={"inputs": base64.b64encode(PNG).decode()})
    data_url = client.post("/v1/caption", json={"inputs": "data:image/png;base64," + base64.b64encode(PNG).decode()})
    for answer in (raw, form, as_json, data_url):
        assert answer.status_code == 200, answer.text
        assert list(answer.json()[0]) == ["generated_text", "score"]
    assert raw.json() == form.json() == as_json.json() == data_url.json()


def test_v1_caption_parameters_from_json_and_query(client: TestClient) -> None:
    body = {"inputs": base64.b64encode(PNG).decode(),
            "parameters": {"num_beams": 3, "num_return_sequences": 3, "max_new_tokens": 4}}
    from_json = client.post("/v1/caption", json=body)
    from_query = client.post("/v1/caption?num_beams=3&num_return_sequences=3&max_new_tokens=4", content=PNG,
                             headers={"content-type": "application/octet-stream"})
    assert from_json.status_code == 200 and len(from_json.json()) == 3
    assert from_json.json() == from_query.json()


@pytest.mark.parametrize("body", [
    {"inputs": "x", "parameters": {"temperature": 1.0}},
    {"inputs": "x", "extra": 1},
    {"inputs": "not base64 !!!"},
    {"inputs": base64.b64encode(PNG).decode(), "parameters": {"num_beams": 2, "num_return_sequences": 3}},
    {"parameters": {}},
])
def test_v1_caption_bad_json_422(client: TestClient, body: dict) -> None:
    answer = client.post("/v1/caption", json=body)
    assert answer.status_code == 422 and "detail" in answer.json()


def test_v1_caption_unsupported_content_type_415(client: TestClient) -> None:
    answer = client.post("/v1/caption", content=b"hello", headers={"content-type": "text/plain"})
    assert answer.status_code == 415 and "Content-Type" in answer.json()["detail"]


# ---------------------------------------------------------------- /captioned and the URL guard


@pytest.fixture(scope="module")
def image_server() -> Iterator[FileServer]:
    """A local image server: /cat.png, redirects, a large body and a slow answer."""
    with file_server({"/cat.png": PNG,
                      "/same-origin-redirect": Answer(status=302, headers={"Location": "/cat.png"}),
                      "/other-origin-redirect": Answer(status=302,
                                                       headers={"Location": "http://169.254.169.254/latest/meta-data"}),
                      "/big": b"\0" * 200_000,
                      "/slow": Answer(PNG, delay_s=1.5)}) as server:
        yield server


def pinned_fetcher(max_bytes: int = 100_000, timeout_s: float = 5.0) -> UrlFetcher:
    """'images.test' resolves (only through this resolver) to 127.0.0.1, which this fetcher accepts."""
    def resolver(host: str, port: int) -> list[str]:
        if host != "images.test":
            raise OSError("unknown host")
        return ["127.0.0.1"]

    return UrlFetcher(["images.test", "*.example.com"], max_bytes, timeout_s, resolver=resolver,
                      address_allowed=lambda ip: True)


def test_captioned_disabled_by_default_403(client: TestClient) -> None:
    answer = client.post("/captioned", json={"imageUrl": "https://example.com/cat.png", "imageName": "cat"})
    assert answer.status_code == 403 and "CAPTION_URL_FETCH" in answer.json()["detail"]


def test_captioned_fetches_allowlisted_url_through_pinned_address(tiny_checkpoint: Path,
                                                                  image_server: FileServer) -> None:
    app = create_app(lambda: api.ExpansionNetBackend.load({"CHECKPOINT": str(tiny_checkpoint)}),
                     ServingSettings(max_wait_ms=1), title="t", url_fetcher=pinned_fetcher())
    url = f"http://images.test:{image_server.port}/same-origin-redirect"
    with TestClient(app) as client:
        answer = client.post("/captioned?num_captions=2&beam_size=2", json={"imageUrl": url, "imageName": "cat"})
        reference = client.post("/predict?num_captions=2&beam_size=2", files={"file": png_file()}).json()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["imageName"] == "cat" and body["imageUrl"] == url and body["captions"] == reference["captions"]
    assert image_server.hosts[-1] == f"images.test:{image_server.port}"  # connected to 127.0.0.1, Host header kept


@pytest.mark.parametrize(("url", "status", "words"), [
    ("http://images.test:{port}/other-origin-redirect", 403, "another origin"),
    ("http://images.test:{port}/missing", 502, "404"),
    ("http://images.test:{port}/big", 413, "limit"),
    ("http://images.test:{port}/slow", 504, "longer"),
    ("http://unlisted.test/cat.png", 403, "allowlist"),
    ("file:///etc/passwd", 422, "http"),
    ("gopher://images.test/x", 422, "http"),
    ("http://user:pw@images.test/cat.png", 422, "credentials"),
    ("http://a.example.com/cat.png", 422, "resolve"),
])
def test_url_fetcher_refusals_carry_status(image_server: FileServer, url: str, status: int, words: str) -> None:
    fetcher = pinned_fetcher(max_bytes=100_000, timeout_s=1.0)
    with pytest.raises(UrlFetchError) as info:
        asyncio.run(fetcher.fetch(url.format(port=image_server.port)))
    assert info.value.status == status and words in info.value.detail


def test_url_fetcher_refuses_allowlisted_host_resolving_to_loopback(image_server: FileServer) -> None:
    fetcher = UrlFetcher(["localhost", "127.0.0.1"], 100_000, 2.0)  # default address check
    port = image_server.port
    for url in (f"http://localhost:{port}/cat.png", f"http://127.0.0.1:{port}/cat.png"):
        with pytest.raises(UrlFetchError) as info:
            asyncio.run(fetcher.fetch(url))
        assert info.value.status == 403 and "non-public" in info.value.detail


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("192.168.0.1", False), ("172.16.5.4", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("2002:7f00:1::", False), ("224.0.0.1", False),
])
def test_url_guard_public_addresses_only(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_url_guard_allowlist_matches_hosts_and_subdomains() -> None:
    allow = ["images.example.org", "*.cdn.example.com"]
    assert host_allowed("IMAGES.example.org.", allow) and host_allowed("a.b.cdn.example.com", allow)
    assert not host_allowed("cdn.example.com", allow) and not host_allowed("evilcdn.example.com", allow)
    assert not host_allowed("images.example.org.evil.com", allow)


# ---------------------------------------------------------------- shared app behaviour, with a fake model


def test_app_applies_exif_orientation_and_converts_modes() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    rotated = image_bytes((40, 20), "JPEG", exif=exif.tobytes())
    cases = {"rotated.jpg": rotated, "rgba.png": image_bytes(mode="RGBA", color=(0, 0, 0, 0)),
             "gray.png": image_bytes(mode="L", color=128), "cmyk.jpg": image_bytes(fmt="JPEG", mode="CMYK",
                                                                                 color=(0, 0, 0, 0)),
             "deep.png": image_bytes(mode="I;16", color=65535), "palette.gif": image_bytes(fmt="GIF", mode="P",
                                                                                           color=3)}
    with fake_client(FakeBackend()) as client:
        captions = {name: client.post("/predict", files={"file": (name, data, "image/*")}).json()["caption"]
                    for name, data in cases.items()}
    assert captions["rotated.jpg"].startswith("RGB 20x40")
    assert captions["rgba.png"].endswith("(255, 255, 255)")  # transparent over white, not black
    assert captions["gray.png"].endswith("(128, 128, 128)") and captions["deep.png"].endswith("(255, 255, 255)")
    assert all(c.startswith("RGB ") for c in captions.values())


def test_app_model_failure_is_json_500_for_that_request_only() -> None:
    backend = FakeBackend(fail_when_width=13)
    with fake_client(backend) as client:
        bad = client.post("/predict", files={"file": png_file(data=image_bytes((13, 13)))})
        good = client.post("/predict", files={"file": png_file()})
        health = client.get("/health")
    assert bad.status_code == 500 and "internal model error" in bad.json()["detail"]
    assert good.status_code == 200 and health.status_code == 200


def test_app_full_queue_answers_503_with_retry_after() -> None:
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    with fake_client(backend, queue_size=1, max_batch_size=1, retry_after_s=7) as client:
        batcher = client.app.state.serving.batcher
        results: list[int] = []

        def post() -> None:
            results.append(client.post("/predict", files={"file": png_file()}).status_code)

        workers = [threading.Thread(target=post) for _ in range(2)]
        workers[0].start()
        _wait_for(lambda: len(backend.calls) == 1)  # the first request is in the (blocked) model
        workers[1].start()
        _wait_for(lambda: batcher.waiting == 1)  # the second one fills the queue
        refused = client.post("/predict", files={"file": png_file()})
        gate.set()
        for worker in workers:
            worker.join(10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "7" and "busy" in refused.json()["detail"]
    assert results == [200, 200]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    """Poll a condition that an idle machine reaches in milliseconds; the limit only ends a hung test."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_app_body_limit_413_from_header_and_stream() -> None:
    big = image_bytes((256, 256), "BMP")
    with fake_client(FakeBackend(), max_body_bytes=10_000) as client:
        declared = client.post("/v1/caption", content=big, headers={"content-type": "image/bmp"})
        streamed = client.post("/v1/caption", content=iter([big[:6000], big[6000:]]),
                               headers={"content-type": "image/bmp"})
        form = client.post("/predict", files={"file": ("big.bmp", big, "image/bmp")})
    for answer in (declared, streamed, form):
        assert answer.status_code == 413 and "limit of 10000 bytes" in answer.json()["detail"]


def test_app_pixel_limit_refuses_decompression_bomb() -> None:
    bomb = image_bytes((5000, 5000), "PNG", mode="L", color=0)  # 25 MP in about 25 kB
    with fake_client(FakeBackend(), max_pixels=1_000_000) as client:
        answer = client.post("/predict", files={"file": ("bomb.png", bomb, "image/png")})
    assert len(bomb) < 100_000
    assert answer.status_code == 422 and "above the limit" in answer.json()["detail"]


def test_app_uploads_never_touch_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an upload was written to disk")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", refuse)
    for name in ("NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.chdir(tmp_path)
    big = image_bytes((800, 800), "BMP")  # 1.9 MB: above starlette's 1 MB spooling threshold
    with fake_client(FakeBackend()) as client:
        answer = client.post("/predicts", files=[("files", ("../../x/passwd.bmp", big, "image/bmp"))] * 2)
    assert answer.status_code == 200 and answer.json()[0]["filename"] == "../../x/passwd.bmp"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- micro-batching


def _run_batcher(scenario, run_batch, **kwargs):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        batcher = MicroBatcher(run_batch, **kwargs)
        await batcher.start()
        try:
            return await scenario(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_batcher_groups_requests_by_params_within_a_batch() -> None:
    calls: list[tuple[list[str], str]] = []

    def run(items: list[str], params: str) -> list[str]:
        calls.append((items, params))
        return [f"{item}/{params}" for item in items]

    async def scenario(batcher: MicroBatcher) -> list[list[str]]:
        jobs = [batcher.submit([f"i{n}"], "beam3" if n % 2 else "beam5") for n in range(6)]
        return await asyncio.gather(*jobs)

    results = _run_batcher(scenario, run, max_batch_size=16, max_wait_ms=50)
    assert results == [[f"i{n}/{'beam3' if n % 2 else 'beam5'}"] for n in range(6)]
    assert sorted(calls) == [(["i0", "i2", "i4"], "beam5"), (["i1", "i3", "i5"], "beam3")]


def test_batcher_respects_max_batch_size_and_one_thread() -> None:
    sizes: list[int] = []
    threads: set[str] = set()

    def run(items: list[int], params: None) -> list[int]:
        sizes.append(len(items))
        threads.add(threading.current_thread().name)
        return [item * 2 for item in items]

    async def scenario(batcher: MicroBatcher) -> list[list[int]]:
        return await asyncio.gather(*(batcher.submit([n, n], None) for n in range(10)))

    results = _run_batcher(scenario, run, max_batch_size=5, max_wait_ms=20)
    assert results == [[2 * n, 2 * n] for n in range(10)]
    assert max(sizes) <= 5 and sum(sizes) == 20 and len(sizes) < 10  # batched, never above the limit
    assert len(threads) == 1 and threads.pop().startswith("caption-model")


def test_batcher_failure_reaches_only_the_bad_job() -> None:
    def run(items: list[int], params: None) -> list[int]:
        if -1 in items:
            raise ValueError("bad item")
        return items

    async def scenario(batcher: MicroBatcher) -> list:
        return await asyncio.gather(*(batcher.submit([n], None) for n in (1, -1, 2)), return_exceptions=True)

    results = _run_batcher(scenario, run, max_batch_size=8, max_wait_ms=20)
    assert results[0] == [1] and results[2] == [2] and isinstance(results[1], ValueError)


# ---------------------------------------------------------------- settings


def test_settings_from_file_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "api.json"
    config.write_text(json.dumps({"CAPTION_CHECKPOINT": "ckpt/best.pth", "CAPTION_MAX_BATCH_SIZE": 4,
                                  "CAPTION_URL_FETCH": True, "CAPTION_URL_ALLOWLIST": ["images.example.org"]}))
    env = {"CAPTION_API_CONFIG": str(config), "CAPTION_MAX_BATCH_SIZE": "8", "CAPTION_DEVICE": "cuda:1"}
    settings, model = load_settings("CAPTION", api.MODEL_KEYS, path_keys=("CHECKPOINT",), environ=env)
    assert settings.max_batch_size == 8 and settings.url_fetch and settings.url_allowlist == ("images.example.org",)
    assert model == {"CHECKPOINT": str(tmp_path / "ckpt/best.pth"), "VOCAB": None, "DEVICE": "cuda:1",
                     "PRECISION": "auto", "BACKEND": "auto", "ONNX_CACHE": None, "COMPILE": "false"}
    defaults, _ = load_settings("CAPTION", api.MODEL_KEYS, environ={})
    assert defaults == ServingSettings() and not defaults.url_fetch


@pytest.mark.parametrize(("env", "message"), [
    ({"CAPTION_MAX_BATCH_SIZE": "many"}, "CAPTION_MAX_BATCH_SIZE"),
    ({"CAPTION_QUEUE_SIZE": "0"}, "queue_size"),
    ({"CAPTION_URL_FETCH": "maybe"}, "CAPTION_URL_FETCH"),
    ({"CAPTION_BEAM_SIZE": "20"}, "max_beam_size"),
])
def test_settings_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings("CAPTION", api.MODEL_KEYS, environ=env)


def test_settings_file_unknown_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "api.json"
    config.write_text(json.dumps({"CAPTION_CHECKPOINT": "x.pth", "CAPTION_BATCH": 3}))
    with pytest.raises(SettingsError, match="CAPTION_BATCH"):
        load_settings("CAPTION", api.MODEL_KEYS, environ={"CAPTION_API_CONFIG": str(config)})


def test_settings_drive_the_api_app(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = tmp_path / "api.json"
    config.write_text(json.dumps({"CAPTION_CHECKPOINT": tiny_checkpoint.name, "CAPTION_MAX_BEAM_SIZE": 2,
                                  "CAPTION_BEAM_SIZE": 2}))
    (tmp_path / tiny_checkpoint.name).write_bytes(tiny_checkpoint.read_bytes())
    with TestClient(api.build_app(environ={"CAPTION_API_CONFIG": str(config)})) as client:
        assert client.post("/predict?beam_size=3", files={"file": png_file()}).status_code == 422
        assert client.post("/predict?beam_size=2", files={"file": png_file()}).status_code == 200
        assert client.get("/ready").json()["limits"]["max_beam_size"] == 2
