"""The web page in a real headless Chromium: pick an image, see it and its captions (screenshot in test-artifacts/)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from conftest import tiny_config, tiny_vocab

from deploy.checkpoints import save_model_checkpoint
from models import build_model
from serving.testing import image_bytes, uvicorn_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# As root on a closed network Chromium needs the sandbox off and its background connections disabled.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=412,915")

WAIT_S = 180  # only ends a hung page: a loaded 2-core machine takes seconds where a quiet one takes milliseconds


def test_web_page_uploads_image_and_shows_captions(tmp_path: Path) -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make setup` (it installs Debian's chromium and "
                    "chromium-driver) to run the browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    torch.manual_seed(0)
    cfg = tiny_config()
    checkpoint = save_model_checkpoint(tmp_path / "tiny.pth", build_model(cfg), cfg, tiny_vocab())
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((320, 240), "JPEG", color=(30, 160, 60)))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    env = {"CAPTION_CHECKPOINT": str(checkpoint), "CAPTION_MAX_WAIT_MS": "1"}
    with uvicorn_server("api:app", env, ARTIFACTS / "web_page_server.log") as server:
        expected = httpx.post(f"{server.base_url}/v1/caption?num_beams=3&num_return_sequences=3",
                              content=photo.read_bytes(), headers={"content-type": "image/jpeg"}, timeout=WAIT_S).json()
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.set_page_load_timeout(WAIT_S)
            driver.get(f"{server.base_url}/")
            WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "model").text.startswith("Model:"))
            file_input = driver.find_element(By.CSS_SELECTOR, 'input[type="file"]')
            assert file_input.get_attribute("accept") == "image/*"
            assert file_input.get_attribute("capture") == "environment"
            file_input.send_keys(str(photo))
            WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body")
                                            .get_attribute("data-state") == "captioned")
            shown = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#captions li .text")]
            scores = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#captions li .score")]
            preview_width = driver.execute_script("return document.getElementById('preview').naturalWidth")
            overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            ARTIFACTS.mkdir(exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "web_page.png"))
        finally:
            driver.quit()
    assert shown == [item["generated_text"] for item in expected] and len(shown) == 3
    assert scores == [f"score {item['score']:.3f}" for item in expected]
    assert preview_width == 320  # the chosen image is displayed
    assert overflow <= 0  # fits a phone-width viewport without horizontal scrolling
    assert (ARTIFACTS / "web_page.png").stat().st_size > 1000
