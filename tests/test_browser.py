"""app.html in a real browser: Debian's headless chromium, driven by Playwright, against app.py served
on the tiny checkpoint. Outside CI, a missing browser skips these tests; in CI it fails them."""
import base64
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

GOLDEN = Path(__file__).parent / "golden"
IMAGE = GOLDEN / "astronaut128.png"
CHROMIUM = shutil.which("chromium")
# Debian's chromium, headless, touching no network and no profile but a fresh one (Playwright's own).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def missing(reason):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tiny):
    """app.py on the tiny checkpoint, on a free port of this machine; its address."""
    try:
        import uvicorn
    except ImportError:
        missing("app.py's packages are not installed: pip install -r requirements-app.txt")
    import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app.make_app(tiny, app.parse_args([])), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright is not installed: pip install -r requirements-app.txt")
    if CHROMIUM is None:
        missing("no chromium on PATH: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(accept_downloads=True, viewport={"width": 1200, "height": 900})
    page.add_init_script(KEEP_SENT_MASK)
    page.goto(server)
    yield page
    page.close()


def open_photo(page, path=IMAGE):
    page.set_input_files("#photo", path)
    page.wait_for_function(f"document.getElementById('view').width === {Image.open(path).width}")


def drag(page, points, brush=24):
    """A stroke with the mouse through `points`, given in the photo's pixels."""
    page.fill("#brush", str(brush))
    page.dispatch_event("#brush", "input")
    page.locator("#view").scroll_into_view_if_needed()
    box = page.locator("#view").bounding_box()
    scale = box["width"] / page.eval_on_selector("#view", "c => c.width")
    to_screen = lambda x, y: (box["x"] + x * scale, box["y"] + y * scale)
    page.mouse.move(*to_screen(*points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*to_screen(*point), steps=8)
    page.mouse.up()


def run(page, steps=2):
    """Press Run and wait for the run's end; the mask that it sent, as a PNG's bytes."""
    page.fill("input[name=steps]", str(steps))
    page.click("#run")
    page.wait_for_function("!document.getElementById('run').disabled")
    return base64.b64decode(page.evaluate("window.sentMask"))


# Chromium does not show a request's file parts to Playwright, so the page's fetch is wrapped to keep
# the mask file of each request it sends, as base64, before sending it.
KEEP_SENT_MASK = """
const send = window.fetch;
window.fetch = async (url, options) => {
  if (options && options.body instanceof FormData) {
    const bytes = new Uint8Array(await options.body.get("mask").arrayBuffer());
    window.sentMask = btoa(Array.from(bytes, b => String.fromCharCode(b)).join(""));
  }
  return send(url, options);
};
"""


def hole(png, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(png)
    return np.asarray(Image.open(path).convert("L")) >= 128


def test_the_form_starts_at_options_defaults(page):
    from ldm_min import Options

    page.wait_for_function("document.querySelector('[name=steps]').value !== ''")
    form = page.eval_on_selector_all("#options [name]", "inputs => Object.fromEntries(inputs.map("
                                     "i => [i.name, i.type === 'checkbox' ? i.checked : i.value]))")
    defaults = {name: value if isinstance(value, bool) else str(value) for name, value in asdict(Options()).items()}
    assert form == {name: defaults[name] for name in form} and len(form) == len(defaults) - 1  # all but invert_mask


def test_painted_stroke_runs_with_previews_and_downloads_the_command_lines_picture(page, cli, tmp_path):
    open_photo(page)
    drag(page, [(30, 40), (70, 60), (100, 90)])
    mask = run(page, steps=2)
    (tmp_path / "mask.png").write_bytes(mask)
    assert page.text_content("#status").startswith("step 2 of 2")
    for preview in ("#z0", "#z0hat"):
        assert page.eval_on_selector(preview, "img => img.src").startswith("data:image/png")
    page.fill("#after", "50")  # the result left of the middle, the photo and the painted hole right of it
    page.screenshot(path=tmp_path / "page.png", full_page=True)
    with page.expect_download() as download:
        page.click("#download")
    download.value.save_as(tmp_path / "download.png")
    status, err = cli(IMAGE, tmp_path / "mask.png", "-o", tmp_path / "cli.png", "--steps", 2)
    assert status == 0, err
    assert set(np.unique(np.asarray(Image.open(tmp_path / "mask.png").convert("L")))) == {0, 255}  # binary
    assert hole(mask, tmp_path, "m.png")[60, 70]  # on the stroke
    assert (tmp_path / "download.png").read_bytes() == (tmp_path / "cli.png").read_bytes()


def test_eraser_and_undo_change_the_mask_that_is_sent(page, tmp_path):
    open_photo(page)
    drag(page, [(20, 64), (108, 64)], brush=30)
    painted = hole(run(page, steps=1), tmp_path, "painted.png")
    page.click("#erase")
    drag(page, [(64, 20), (64, 108)], brush=20)
    erased = hole(run(page, steps=1), tmp_path, "erased.png")
    page.click("#undo")
    undone = hole(run(page, steps=1), tmp_path, "undone.png")
    assert painted[64, 30] and painted[64, 64] and not erased[64, 64] and erased[64, 30]
    assert (erased <= painted).all() and (undone == painted).all()


def test_a_file_that_is_not_an_image_shows_its_message(page):
    page.set_input_files("#photo", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}])
    page.wait_for_function("document.getElementById('error').textContent !== ''")
    assert page.text_content("#error") == "notes.txt: not an image this browser can open"


def test_the_servers_message_for_an_empty_mask_shows_in_the_page(page):
    open_photo(page)
    run(page, steps=1)
    assert page.text_content("#error").startswith("the mask marks no pixel to paint")


def test_a_thin_stroke_shows_the_warning_with_its_remedy(page):
    open_photo(page)
    drag(page, [(62, 30), (62, 100)], brush=2)  # 2 pixels wide, between the latent grid's sampled columns
    run(page, steps=1)
    assert "will not be repainted; use --latent-mask cover" in page.text_content("#warnings")
