"""The Gradio app, started through its CLI in a subprocess on a free port and queried over HTTP (and a browser)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import CHROMIUM, RUN_BACKBONES, scene_image

from test_interpret import _bomb_png

pytest.importorskip("gradio", reason="the app needs the `app` extra")
from gradio_client import Client, handle_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_run):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.app", "--run-dir", str(tiny_run), "--port", str(port)],
                            cwd=REPO, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start:\n{proc.stdout.read()}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    scene_image().save(d / "scene.png")
    (d / "garbage.png").write_bytes(b"not an image at all")
    (d / "huge.png").write_bytes(_bomb_png(20000))  # 20000 x 20000 pixels, as far as PIL is concerned
    return d


def test_one_row_per_backbone(client, files):
    plot, table, status = client.predict(handle_file(files / "scene.png"), "the red square", list(RUN_BACKBONES),
                                         "4, 4, 18, 18", api_name="/analyze")
    assert [row[0] for row in table["data"]] == list(RUN_BACKBONES)
    assert all(row[4] is not None for row in table["data"])  # IoU against the given box
    assert plot["type"] == "plotly" and status.startswith("Grounded with")


@pytest.mark.parametrize("image,expression,backbones,gt,message", [
    (None, "the red square", None, "", "no image given"),
    ("garbage.png", "the red square", None, "", "not a readable image"),
    ("huge.png", "the red square", None, "", "too large to decode safely"),
    ("scene.png", "", None, "", "expression is empty"),
    ("scene.png", "x" * 10000, None, "", "at most 500 are accepted"),
    ("scene.png", "the red square", [], "", "no backbone selected"),
    ("scene.png", "the red square", None, "4, 4, 2", "ground-truth box"),
], ids=["no-image", "unreadable", "20000x20000", "empty-expression", "10000-chars", "no-backbone", "bad-gt-box"])
def test_bad_input_gives_a_clear_message(client, files, image, expression, backbones, gt, message):
    plot, table, status = client.predict(None if image is None else handle_file(files / image), expression,
                                         list(RUN_BACKBONES) if backbones is None else backbones, gt,
                                         api_name="/analyze")
    assert status.startswith("**Cannot run:**") and message in status
    assert plot is None and table["data"] == []


def test_non_image_file_type_is_refused_by_name(client, files):
    (files / "notes.txt").write_text("hello")
    with pytest.raises(Exception, match="Invalid file type"):
        client.predict(handle_file(files / "notes.txt"), "the red square", list(RUN_BACKBONES), "",
                       api_name="/analyze")


@pytest.mark.browser
def test_browser_upload_type_and_run(app_url, files, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        page.locator("input[type=file]").first.set_input_files(str(files / "scene.png"))
        page.get_by_label("referring expression").fill("the red square")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Grounded with").wait_for(timeout=60_000)
        for name in RUN_BACKBONES:
            assert page.get_by_role("gridcell", name=name, exact=True).count() == 1
        page.screenshot(path=tmp_path / "app.png", full_page=True)
        page.get_by_label("referring expression").fill("")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Cannot run: the referring expression is empty").first.wait_for(timeout=30_000)
        browser.close()
