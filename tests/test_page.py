"""The web page at `/` in a real browser: headless Chromium (Debian's chromium and chromedriver,
driven by selenium) picks an example photo, runs caption (streamed), detect and segment on the
demo model, and the test reads the page: the streamed text, the objects listed, and the boxes
and masks drawn on the canvas (its pixels), against the model run in this process."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selenium import webdriver  # noqa: E402  (test-serve extra, installed by scripts/setup.sh)

from tests.test_server import IMAGES, Server  # noqa: E402

import mlx_paligemma as pg  # noqa: E402
from mlx_paligemma.detection import parse_detections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTO = IMAGES / "chelsea.jpg"
SCREENSHOT = os.environ.get("PALIGEMMA_PAGE_SCREENSHOT")  # e.g. examples/web-page.png, written when set


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        if sys.platform != "linux":
            pytest.skip("no chromium/chromedriver here; scripts/setup.sh installs them on Linux only")
        # scripts/setup.sh installs Debian's chromium and chromium-driver on Linux: a missing one is a failure
        pytest.fail("the page test needs chromium and chromedriver (scripts/setup.sh installs them on Linux)")
    return browser, driver


@pytest.fixture(scope="module")
def model():
    return pg.load("demo", backend="torch", dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(server):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium()
    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.set_page_load_timeout(60)
    yield b
    b.quit()


def wait_for_state(browser, states=("done", "error"), seconds=120) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, seconds, poll_frequency=0.1).until(
        lambda b: b.execute_script("return document.body.dataset.state") in states)
    return browser.execute_script("return document.body.dataset.state")


def pixel(browser, x: int, y: int) -> list[int]:
    return browser.execute_script(
        "return Array.from(document.getElementById('canvas').getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data)",
        x, y)


def test_the_page_captions_with_a_stream_and_draws_detected_boxes(server, browser, model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda b: "demo" in b.find_element(By.ID, "model").text)
    assert browser.find_element(By.ID, "demo-note").is_displayed()
    browser.find_element(By.ID, "file").send_keys(str(PHOTO))
    WebDriverWait(browser, 30).until(lambda b: b.execute_script(
        "const c = document.getElementById('canvas'); return !c.hidden && c.width === 448 && c.height === 298"))

    # caption, streamed: the page shows the pieces as they come, then the whole answer
    Select(browser.find_element(By.ID, "task")).select_by_value("caption")
    for field, value in (("max-tokens", "8"), ("temperature", "0.8"), ("seed", "5")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => window.seen.push(document.getElementById('answer').textContent))
            .observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true});""")
    browser.find_element(By.ID, "run").click()
    assert wait_for_state(browser) == "done", browser.find_element(By.ID, "status").text
    ref = model.generate(PHOTO, "caption en", max_tokens=8, temperature=0.8, seed=5)
    assert browser.execute_script("return document.getElementById('answer').textContent") == ref.text
    seen = browser.execute_script("return window.seen")
    assert len(set(seen)) >= 3 and all(ref.text.startswith(s) for s in seen)  # it grew piece by piece
    assert "8 tokens" in browser.find_element(By.ID, "status").text

    # detect: the objects are listed and their boxes drawn over the photo in their colours
    Select(browser.find_element(By.ID, "task")).select_by_value("detect")
    browser.find_element(By.ID, "argument").send_keys("cat ; ear")
    browser.find_element(By.ID, "run").click()
    assert wait_for_state(browser) == "done", browser.find_element(By.ID, "status").text
    # the server holds detect answers to the objects' grammar: well-formed boxes even from random weights
    ref = model.generate(PHOTO, "detect cat ; ear", max_tokens=8, temperature=0.8, seed=5, constrain=True)
    boxes = parse_detections(ref.text, ref.image_size)
    assert boxes, "the test needs an answer with boxes"
    items = browser.find_elements(By.CSS_SELECTOR, "#objects li")
    assert len(items) == len(boxes)
    for item, want in zip(items, boxes):
        got = [float(v) for v in item.get_attribute("data-box").split(",")]
        assert got == pytest.approx(want.box, abs=0.06)
        colour = [int(v) for v in item.get_attribute("data-colour").split(",")]
        x0, y0 = int(want.box[0]), int(want.box[1])
        # the box's outline starts at its top-left corner, in the label's colour
        assert pixel(browser, min(x0 + 1, 447), min(y0 + 1, 297))[:3] == colour

    # segment: the mask is painted translucently over the photo in its label's colour
    Select(browser.find_element(By.ID, "task")).select_by_value("segment")
    box = browser.find_element(By.ID, "max-tokens")
    box.clear()
    box.send_keys("24")
    browser.find_element(By.ID, "run").click()
    assert wait_for_state(browser) == "done", browser.find_element(By.ID, "status").text
    ref = model.segment(PHOTO, "cat ; ear", max_tokens=24, temperature=0.8, seed=5, constrain=True)
    assert len(ref.segments) == 1 and ref.segments[0].area > 0
    items = browser.find_elements(By.CSS_SELECTOR, "#objects li")
    assert len(items) == 1 and f"({ref.segments[0].area} px)" in items[0].text
    colour = np.array([int(v) for v in items[0].get_attribute("data-colour").split(",")])
    mask = ref.segments[0].mask
    inside = [(y, x) for y, x in zip(*np.nonzero(mask)) if mask[max(y - 4, 0):y + 5, max(x - 4, 0):x + 5].all()]
    y, x = inside[len(inside) * 3 // 4]  # well inside the mask, below its label
    photo = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=float)[y, x]
    shown = np.array(pixel(browser, int(x), int(y))[:3], dtype=float)
    assert np.abs(shown - (0.55 * photo + 0.45 * colour)).max() <= 4  # the browser's JPEG decoder may differ by a little
    if SCREENSHOT:
        browser.save_screenshot(str(ROOT / SCREENSHOT))
