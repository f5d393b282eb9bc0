"""app.html in a real browser: Debian's headless chromium, driven by Playwright, against app.py served
on the tiny checkpoint. Outside CI, a missing browser skips these tests; in CI it fails them."""
import base64
import contextlib
import io
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


@contextlib.contextmanager
def serving(models, *argv):
    """app.py with these arguments on a free port of this machine, in a thread; its address."""
    try:
        import uvicorn
    except ImportError:
        missing("app.py's packages are not installed: pip install -r requirements-app.txt")
    import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = app.parse_args(["--port", str(port), *argv])
    server = uvicorn.Server(uvicorn.Config(app.make_app(models, args), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join()


@pytest.fixture(scope="module")
def server(tiny):
    """app.py on the tiny checkpoint; its address."""
    with serving(tiny) as address:
        yield address


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
    page.add_init_script(KEEP_SENT)
    page.goto(server)
    yield page
    page.close()


def open_photo(page, path=IMAGE):
    page.set_input_files("#photo", path)
    page.wait_for_function(f"document.getElementById('view').width === {Image.open(path).width}")


def drag(page, points, brush=24):
    """A stroke with the mouse through `points`, given in the photo's pixels, as is the brush's size
    (the page's brush is sized on screen)."""
    page.locator("#view").scroll_into_view_if_needed()
    box = page.locator("#view").bounding_box()
    scale = box["width"] / page.eval_on_selector("#view", "c => c.width")
    set_brush(page, round(brush * scale))
    to_screen = lambda x, y: (box["x"] + x * scale, box["y"] + y * scale)
    page.mouse.move(*to_screen(*points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*to_screen(*point), steps=8)
    page.mouse.up()


def set_brush(page, size):
    page.fill("#brush", str(size))
    page.dispatch_event("#brush", "input")


def run(page, steps=2):
    """Press Run and wait for the run's end; the mask that it sent, as a PNG's bytes."""
    page.fill("input[name=steps]", str(steps))
    page.click("#run")
    page.wait_for_function("!document.getElementById('run').disabled")
    return sent(page, "mask")


def sent(page, part):
    """A file part ('image' or 'mask') of the last run the page sent: its bytes."""
    return base64.b64decode(page.evaluate(f"window.sent.{part}"))


# Chromium does not show a request's file parts to Playwright, so the page's fetch is wrapped to keep
# the files of each request it sends, as base64, before sending it.
KEEP_SENT = """
const send = window.fetch;
const base64 = async file =>
  btoa(Array.from(new Uint8Array(await file.arrayBuffer()), b => String.fromCharCode(b)).join(""));
window.fetch = async (url, options) => {
  if (options && options.body instanceof FormData)
    window.sent = { image: await base64(options.body.get("image")), mask: await base64(options.body.get("mask")) };
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


def test_with_the_blend_chosen_the_second_preview_says_it_shows_the_blended_z(page):
    open_photo(page)
    drag(page, [(30, 40), (100, 90)])
    assert page.text_content("#projection").startswith("ẑ0|t: line 4, eq. 5")  # the paper's, the default
    page.select_option("select[name=method]", "blend")
    run(page, steps=2)
    assert page.text_content("#status").startswith("step 2 of 2")
    assert page.text_content("#projection").startswith("zt-1, blended")


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


def test_the_servers_message_for_an_empty_mask_shows_beside_run(page):
    open_photo(page)
    run(page, steps=1)
    assert page.text_content("#error").startswith("the mask marks no pixel to paint")
    assert page.text_content("#status") == "" and beside_run(page, "#error")


def test_a_thin_stroke_shows_the_warning_with_its_remedy(page):
    open_photo(page)
    drag(page, [(62, 30), (62, 100)], brush=2)  # 2 pixels wide, between the latent grid's sampled columns
    run(page, steps=1)
    assert "will not be repainted; use --latent-mask cover" in page.text_content("#warnings")


def mask_now(page):
    """The mask the page would send now, as booleans (True: the hole), checked to be binary."""
    data = page.evaluate("maskPNG().then(blob => blob.arrayBuffer()).then(bytes => "
                         "btoa(Array.from(new Uint8Array(bytes), b => String.fromCharCode(b)).join('')))")
    grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("L"))
    assert set(np.unique(grey)) <= {0, 255}
    return grey == 255


def status_is(page, start):
    page.wait_for_function(f"document.getElementById('status').textContent.startsWith({start!r})")


def start_long_run(page):
    """A run of 1000 steps (minutes) from `page`, under way: past its first step. Its status passes each
    step in turn, so a wait for exactly "step 2" can miss it between two polls: with one core kept busy,
    1 wait in 8 timed out while the status said step 197."""
    open_photo(page)
    drag(page, [(30, 40), (100, 90)])
    page.fill("input[name=steps]", "1000")
    page.click("#run")
    page.wait_for_function(r"(m => m !== null && Number(m[1]) >= 2)"
                           r"(document.getElementById('status').textContent.match(/^step (\d+) of 1000 /))")


def beside_run(page, selector):
    """Whether the element is in view right under the Run button, where the user is looking."""
    run, element = page.locator("#run").bounding_box(), page.locator(selector).bounding_box()
    return 0 <= element["y"] - run["y"] < 3 * run["height"] and element["y"] + element["height"] <= 900


def test_reloading_during_a_run_stops_it_and_a_new_run_then_finishes(page, server):
    import httpx

    start_long_run(page)
    steps = []  # the old run's steps done, as the server tells them
    with httpx.Client(base_url=server) as http:
        steps.append(http.get("status").json()["step"])
        page.evaluate("setTimeout(() => location.reload(), 100)")  # returns at once: the server is watched meanwhile
        for _ in range(10000):  # a bound: the run left alone goes on to its 1000th step, and ends there
            now = http.get("status").json()
            if not now["running"]:
                break
            steps.append(now["step"])
            time.sleep(0.005)
    assert not now["running"] and max(steps) < 500  # it stopped near where its page went, not at its end
    page.wait_for_load_state()
    open_photo(page)
    drag(page, [(30, 40), (100, 90)])
    run(page, steps=2)
    assert page.text_content("#status").startswith("step 2 of 2") and page.text_content("#status").endswith(": done")


def test_a_page_opened_during_a_run_says_so_beside_run_and_its_cancel_stops_that_run(page, browser, server):
    start_long_run(page)
    other = browser.new_page(viewport={"width": 1200, "height": 900})
    other.goto(server)
    status_is(other, "another page's run is in progress: step ")
    assert other.is_disabled("#run") and other.is_enabled("#cancel") and beside_run(other, "#status")
    other.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent.endsWith(': cancelled')")
    other.wait_for_function("!document.getElementById('run').disabled")
    assert other.text_content("#status") == "the other run has ended: Run is free" and other.is_disabled("#cancel")
    other.close()


def test_a_run_refused_as_busy_is_said_beside_run_and_the_page_follows_the_other_run(page, browser, server):
    other = browser.new_page(viewport={"width": 1200, "height": 900})
    other.goto(server)
    open_photo(other)
    drag(other, [(30, 40), (100, 90)])
    start_long_run(page)
    other.click("#run")
    other.wait_for_function("document.getElementById('error').textContent.startsWith('busy: ')")
    status_is(other, "another page's run is in progress")
    assert beside_run(other, "#error") and other.is_enabled("#cancel")
    other.click("#cancel")
    other.wait_for_function("!document.getElementById('run').disabled")
    other.close()


def test_an_option_the_server_refuses_is_said_beside_run_and_the_status_does_not_stay_at_starting(page):
    open_photo(page)
    drag(page, [(30, 40), (100, 90)])
    page.fill("input[name=eta]", "1.5")
    run(page, steps=1)
    assert page.text_content("#error") == "eta must be between 0 and 1, got 1.5" and page.text_content("#status") == ""
    assert beside_run(page, "#error")


@pytest.mark.parametrize("size", [(300, 200), (4000, 3000)])
def test_the_brush_is_sized_in_screen_pixels_whatever_the_photos_size(page, tmp_path, size):
    Image.new("RGB", size, (90, 140, 200)).save(tmp_path / "photo.png")
    open_photo(page, tmp_path / "photo.png")
    set_brush(page, 60)
    box = page.locator("#view").bounding_box()
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.move(*centre)
    page.mouse.down()
    page.mouse.up()
    columns = np.nonzero(mask_now(page).any(0))[0]
    photo_pixel = box["width"] / size[0]  # on screen
    assert abs((columns[-1] - columns[0] + 1) * photo_pixel - 60) <= photo_pixel + 1
    outline = page.locator("#outline").bounding_box()  # the brush's outline, under the pointer
    assert abs(outline["width"] - 60) <= 1 and abs(outline["x"] + outline["width"] / 2 - centre[0]) <= 1


def test_brackets_resize_the_brush_by_a_tenth(page):
    open_photo(page)
    set_brush(page, 50)
    sizes = []
    for key in "][":
        page.keyboard.press(key)
        sizes.append(page.text_content("#brushSize"))
    assert sizes == ["55", "49"]


def test_x_switches_to_the_eraser_and_back_and_ctrl_z_undoes_each_stroke(page):
    open_photo(page)
    drag(page, [(20, 64), (108, 64)], brush=30)
    painted = mask_now(page)
    page.keyboard.press("x")
    drag(page, [(64, 20), (64, 108)], brush=20)
    erased = mask_now(page)
    page.keyboard.press("Control+z")
    undone = mask_now(page)
    page.keyboard.press("Control+z")
    assert painted[64, 30] and not erased[64, 64] and erased[64, 30] and (erased <= painted).all()
    assert (undone == painted).all() and not mask_now(page).any()
    assert page.get_attribute("#erase", "class") == "on"
    page.keyboard.press("X")
    assert page.get_attribute("#paint", "class") == "on"


def test_keys_typed_into_a_field_are_not_shortcuts(page):
    open_photo(page)
    page.click("input[name=prompt]")
    page.keyboard.type("x]")
    assert page.input_value("input[name=prompt]") == "x]"
    assert page.get_attribute("#paint", "class") == "on" and page.text_content("#brushSize") == "30"


def test_ctrl_wheel_zooms_around_the_pointer_and_a_stroke_still_lands_under_it(page):
    open_photo(page)
    page.locator("#view").scroll_into_view_if_needed()
    box = page.locator("#view").bounding_box()
    scale = box["width"] / 128
    point = (box["x"] + 40.5 * scale, box["y"] + 50.5 * scale)  # over the photo's pixel (40, 50)
    page.mouse.move(*point)
    page.keyboard.down("Control")
    for _ in range(3):
        page.mouse.wheel(0, -100)
    page.keyboard.up("Control")
    assert page.text_content("#zoomLevel") == "zoom 195%"  # 1.25 ** 3
    set_brush(page, 10)
    page.mouse.down()
    page.mouse.up()
    rows, columns = np.nonzero(mask_now(page))
    assert abs(columns.mean() - 40.5) < 1 and abs(rows.mean() - 50.5) < 1


def test_use_result_as_input_runs_again_over_the_result(page, tmp_path):
    open_photo(page)
    drag(page, [(30, 40), (100, 90)])
    run(page, steps=1)
    with page.expect_download() as download:
        page.click("#download")
    download.value.save_as(tmp_path / "result.png")
    page.click("#reuse")
    page.wait_for_function("document.getElementById('reuse').hidden")
    assert not mask_now(page).any()
    drag(page, [(20, 20), (40, 40)])
    run(page, steps=1)
    assert sent(page, "image") == (tmp_path / "result.png").read_bytes()
    assert page.text_content("#status").endswith(": done")


def test_opened_at_the_address_with_its_token_the_page_runs(browser, tiny):
    with serving(tiny, "--token", "t0k3n") as address:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        assert page.goto(address).status == 403  # without it
        page.goto(address + "?token=t0k3n")
        open_photo(page)
        drag(page, [(30, 40), (100, 90)])
        page.fill("input[name=steps]", "1")
        page.click("#run")  # the cookie the address left goes with the run
        page.wait_for_function("document.getElementById('status').textContent.endsWith(': done')")
        page.close()
