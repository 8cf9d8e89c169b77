"""The installable web app in a real headless Chromium: a valid manifest, a registered service worker, an upload and a
share that show captions, then the server stopped: the app opens from its cache and says it is offline."""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, tiny_vocab
from PIL import Image
from test_web_page import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS

from deploy.checkpoints import save_model_checkpoint
from models import build_model
from serving.testing import RunningServer, image_bytes, uvicorn_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
WAIT_S = 180  # only ends a hung page: a loaded 2-core machine takes seconds where a quiet one takes milliseconds


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    torch.manual_seed(0)
    cfg = tiny_config()
    checkpoint = save_model_checkpoint(tmp_path / "tiny.pth", build_model(cfg), cfg, tiny_vocab())
    env = {"CAPTION_CHECKPOINT": str(checkpoint), "CAPTION_MAX_WAIT_MS": "1"}
    with uvicorn_server("api:app", env, ARTIFACTS / "pwa_server.log") as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make setup` (it installs Debian's chromium and "
                    "chromium-driver) to run the browser tests")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: Any, condition: Any) -> Any:
    """Poll condition, ignoring elements that vanish while a navigation replaces the page."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, WAIT_S, ignored_exceptions=ignored).until(condition)


def body_attribute(driver: Any, name: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").get_attribute(name) or ""


def share_form(base_url: str) -> str:
    """A page that posts files the way a phone's share sheet does: multipart to the manifest's share_target."""
    form = (f'<form method="post" enctype="multipart/form-data" action="{base_url}/share">'
            '<input type="file" name="images" multiple><button>share</button></form>')
    return "data:text/html;charset=utf-8," + form


def share_from_browser(driver: Any, base_url: str, photos: list[Path]) -> None:
    from selenium.webdriver.common.by import By

    driver.get(share_form(base_url))
    driver.find_element(By.NAME, "images").send_keys("\n".join(str(photo) for photo in photos))
    driver.find_element(By.TAG_NAME, "button").click()


def test_pwa_installs_captions_shares_and_opens_offline(server: RunningServer, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    photos = [tmp_path / "green.jpg", tmp_path / "blue.png"]
    photos[0].write_bytes(image_bytes((320, 240), "JPEG", color=(30, 160, 60)))
    photos[1].write_bytes(image_bytes((200, 300), "PNG", color=(30, 60, 200)))
    base = server.base_url
    with server.client(timeout=60) as client:
        expected_upload = client.post("/v1/caption?num_beams=3&num_return_sequences=3",
                                      content=photos[0].read_bytes(), headers={"content-type": "image/jpeg"}).json()
        expected_share = [client.post("/predict?beam_size=5&num_captions=3", files={"file": (p.name, p.read_bytes())})
                          .json()["captions"] for p in photos]
        icons = {name: Image.open(io.BytesIO(client.get(f"/icons/{name}").content)).size
                 for name in ("icon-192.png", "icon-512.png", "maskable-512.png")}

    browser.get(f"{base}/")
    wait_until(browser, lambda d: d.find_element(By.ID, "model").text.startswith("Model:"))
    manifest = browser.execute_cdp_cmd("Page.getAppManifest", {})
    installability = browser.execute_cdp_cmd("Page.getInstallabilityErrors", {})
    wait_until(browser, lambda d: body_attribute(d, "data-sw") == "ready")
    worker = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "navigator.serviceWorker.ready.then(async (r) => done({scope: r.scope, active: r.active.state,"
        " caches: await caches.keys()}));")

    file_input = browser.find_element(By.ID, "file")
    assert file_input.get_attribute("accept") == "image/*" and file_input.get_attribute("capture") == "environment"
    file_input.send_keys(str(photos[0]))
    wait_until(browser, lambda d: body_attribute(d, "data-state") == "captioned")
    uploaded = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#captions li .text")]

    share_from_browser(browser, base, photos)
    wait_until(browser, lambda d: body_attribute(d, "data-state") in ("captioned", "failed"))
    shared = [[item.text for item in section.find_elements(By.CSS_SELECTOR, ".captions li .text")]
              for section in browser.find_elements(By.CSS_SELECTOR, "section.shared")]
    shown = browser.execute_script("return [...document.images].map((i) => i.naturalWidth)")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "pwa_share.png"))

    server.process.terminate()  # the server goes away: the app must still open, from its cache
    server.process.wait(timeout=30)
    browser.get(f"{base}/")
    wait_until(browser, lambda d: body_attribute(d, "data-offline") == "true")
    offline_title = browser.find_element(By.TAG_NAME, "h1").text
    offline_notice = browser.find_element(By.ID, "offline")
    offline_shown, offline_text = offline_notice.is_displayed(), offline_notice.text
    browser.save_screenshot(str(ARTIFACTS / "pwa_offline.png"))
    share_from_browser(browser, base, photos[:1])
    wait_until(browser, lambda d: d.find_elements(By.ID, "offline-share"))
    offline_share = browser.find_element(By.ID, "offline-share").text

    assert manifest["errors"] == [], manifest["errors"]
    parsed = json.loads(manifest["data"])
    assert parsed["display"] == "standalone" and parsed["theme_color"] and parsed["name"] and parsed["short_name"]
    assert parsed["share_target"]["action"] == "share" and parsed["share_target"]["method"] == "POST"
    assert parsed["share_target"]["params"]["files"][0]["name"] == "images"
    assert icons == {"icon-192.png": (192, 192), "icon-512.png": (512, 512), "maskable-512.png": (512, 512)}
    assert installability["installabilityErrors"] == [], installability
    assert worker["scope"] == f"{base}/" and worker["active"] == "activated"
    assert [key for key in worker["caches"] if key.startswith("caption-shell-")]
    assert uploaded == [item["generated_text"] for item in expected_upload]
    assert shared == [[caption["caption"] for caption in captions] for captions in expected_share]
    assert shown == [320, 200]  # each shared photo is shown (as a thumbnail of at most 480 px)
    assert offline_title == "Image captioning" and offline_shown and "Offline" in offline_text
    assert "server cannot be reached" in offline_share


def test_share_target_page_escapes_names_and_explains_errors(server: RunningServer) -> None:
    evil = "<script>alert(1)</script>.png"
    with server.client(timeout=60) as client:
        good = client.post("/share", files=[("images", (evil, image_bytes(), "image/png"))],
                           data={"title": "from the gallery", "text": "look"})
        eps = io.BytesIO()
        Image.new("RGB", (8, 8)).save(eps, "EPS")
        refused = client.post("/share", files=[("images", ("figure.eps", eps.getvalue(), "image/png"))])
        empty = client.post("/share", files=[("other", ("a.png", image_bytes(), "image/png"))])
    assert good.status_code == 200 and html.escape(evil) in good.text and evil not in good.text
    assert "script-src" not in good.headers["content-security-policy"]  # the page runs no script at all
    assert len(re.findall(r'<li><span class="text">', good.text)) == 3
    assert refused.status_code == 415 and "EPS images are not accepted" in refused.text
    assert empty.status_code == 422 and "images" in empty.text
    assert refused.headers["content-type"].startswith("text/html")
