"""app.py through FastAPI's test client: a run streamed step by step, its result the command line's,
cancel, busy, and a clear message for each bad input."""
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="app.py's packages are not installed: pip install -r requirements-app.txt")
from fastapi.testclient import TestClient  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
IMAGE, MASK = GOLDEN / "astronaut128.png", GOLDEN / "astronaut128_mask.png"
MAX_UPLOAD_MIB = 1


@pytest.fixture(scope="module")
def client(tiny, blip, device):
    import app

    args = app.parse_args(["--max-upload", str(MAX_UPLOAD_MIB), "--captioner", str(blip), "--device", device])
    with TestClient(app.make_app(tiny, args), base_url="http://127.0.0.1:8000") as client:
        yield client


def upload(path):
    return path.name, path.read_bytes()


def form(image=IMAGE, mask=MASK, **options):
    """The files and fields of a /run request; 3 steps unless said otherwise."""
    return dict(files={"image": upload(image) if isinstance(image, Path) else image,
                       "mask": upload(mask) if isinstance(mask, Path) else mask},
                data={name: str(value) for name, value in {"steps": 3, **options}.items()})


def events(lines):
    """Server-sent events from an iterator of lines, as (name, data) pairs, as they come."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


def run(client, **request):
    """A whole run: its events."""
    response = client.post("/run", **form(**request))
    assert response.status_code == 200, response.text
    return list(events(response.text.splitlines()))


def refused(client, **request):
    """A run refused before it starts: (HTTP status, message)."""
    response = client.post("/run", **form(**request))
    return response.status_code, response.json()["detail"]


def png(data_url):
    return base64.b64decode(data_url.removeprefix("data:image/png;base64,"))


def picture(data_url):
    return Image.open(io.BytesIO(png(data_url)))


def test_page_is_the_one_html_file(client):
    response = client.get("/")
    assert response.status_code == 200 and "<canvas" in response.text


def test_every_step_streams_previews_of_z0_and_z0_hat_at_latent_size(client):
    steps = [data for name, data in run(client, steps=3) if name == "step"]
    assert [s["i"] for s in steps] == [0, 1, 2]
    assert all(picture(s[key]).size == (16, 16) for s in steps for key in ("z0", "z0_hat"))
    assert np.asarray(picture(steps[-1]["z0"])).std() > 0  # a picture, not a blank


def test_z0_hat_preview_differs_from_z0_only_where_the_latent_is_known(client, expected):
    *_, last = [data for name, data in run(client, steps=3) if name == "step"]
    changed = (np.asarray(picture(last["z0"]), np.int16) != np.asarray(picture(last["z0_hat"]))).any(-1)
    known = expected["mask.out.latent_known_dilate2"][0, 0].numpy() == 1
    assert changed.any() and not changed[~known].any()


def test_the_page_offers_the_method_paper_or_blend(client):
    assert client.get("/options").json()["choices"]["method"] == ["paper", "blend"]


def test_a_blend_run_says_its_method_and_streams_the_same_previews(client):
    (name, start), *rest = run(client, steps=2, method="blend")
    steps = [data for name, data in rest if name == "step"]
    assert name == "start" and start["method"] == "blend" and [s["i"] for s in steps] == [0, 1]
    assert all(picture(s[key]).size == (16, 16) for s in steps for key in ("z0", "z0_hat"))


def test_a_blend_runs_second_preview_is_the_blended_z_which_differs_from_z0_in_the_hole_too(client, expected):
    first, *_ = [data for name, data in run(client, steps=3, method="blend") if name == "step"]
    changed = (np.asarray(picture(first["z0"]), np.int16) != np.asarray(picture(first["z0_hat"]))).any(-1)
    known = expected["mask.out.latent_known_dilate2"][0, 0].numpy() == 1
    assert changed[~known].any()


def test_start_carries_the_latent_mask_on_its_8x8_grid(client, expected):
    (name, start), *_ = run(client, steps=1)
    assert name == "start"
    grid = np.array([[c == "1" for c in row] for row in start["grid"]])
    assert (grid == (expected["mask.out.latent_known_dilate2"][0, 0].numpy() == 1)).all()


@pytest.mark.parametrize("options", [{}, {"seed": 5, "eta": 0.3, "dilate": 1, "latent_mask": "cover",
                                          "paste_back": "true", "feather": 2, "prompt": "a cat", "guidance": 3},
                                     {"method": "blend", "seed": 2}])
def test_result_is_the_png_the_command_line_writes(client, cli, tmp_path, options):
    *_, (name, done) = run(client, **options)
    flags = {"dilate": "--mask-dilate"}
    args = [a for k, v in options.items() for a in ([flags.get(k, "--" + k.replace("_", "-"))]
                                                    + ([] if v == "true" else [v]))]
    status, err = cli(IMAGE, MASK, "-o", tmp_path / "cli.png", "--steps", 3, *args)
    assert status == 0, err
    assert name == "done" and png(done["png"]) == (tmp_path / "cli.png").read_bytes()


def test_cancel_stops_the_run_between_two_steps_and_the_next_run_works(client):
    with client.stream("POST", "/run", **form(steps=1000)) as response:
        stream = events(response.iter_lines())
        assert next(e for e in stream if e[0] == "step")[1]["i"] == 0
        assert client.post("/cancel").json() == {"cancelling": True}
        rest = [name for name, _ in stream]
    assert rest[-1] == "cancelled" and len(rest) < 10
    assert run(client, steps=1)[-1][0] == "done"


def test_a_second_run_while_one_runs_is_told_busy(client):
    with client.stream("POST", "/run", **form(steps=1000)) as response:
        stream = events(response.iter_lines())
        next(e for e in stream if e[0] == "step")
        status, message = refused(client)
        client.post("/cancel")
        list(stream)
    assert status == 409 and message.startswith("busy: another run is in progress")


def test_closing_the_stream_stops_the_run_after_its_step_and_frees_the_server(client):
    """A run belongs to the page that reads it: a page reloaded or closed stops reading."""
    with client.stream("POST", "/run", **form(steps=1000)) as response:
        next(e for e in events(response.iter_lines()) if e[0] == "step")
    steps = []  # the steps done, seen while the run is still there
    for _ in range(1000):  # a bound: the run left alone has 1000 steps to go
        now = client.get("/status").json()
        if not now["running"]:
            break
        steps.append(now["step"])
        time.sleep(0.01)
    assert not now["running"] and (not steps or steps[-1] <= steps[0] + 1)  # after the step it was in
    for _ in range(100):
        if not any(t.name == "ldm_min run" for t in threading.enumerate()):
            break  # the run's thread is gone, and its tensors with it
        time.sleep(0.01)
    assert not any(t.name == "ldm_min run" for t in threading.enumerate()) and run(client, steps=1)[-1][0] == "done"


def test_status_tells_a_page_opened_during_a_run_how_far_it_is(client):
    assert client.get("/status").json() == {"running": False}
    with client.stream("POST", "/run", **form(steps=1000)) as response:
        stream = events(response.iter_lines())
        next(e for e in stream if e[0] == "step")
        during = client.get("/status").json()
        client.post("/cancel")
        after_cancel = client.get("/status").json()
        list(stream)
    assert during["running"] and during["step"] >= 1 and during["steps"] == 1000 and not during["cancelling"]
    assert after_cancel["cancelling"] or not after_cancel["running"]
    assert client.get("/status").json() == {"running": False}


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000"])
def test_this_machines_names_for_itself_with_the_port_are_served(client, host):
    assert client.get("/options", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["rebind.evil.example", "rebind.evil.example:8000", "127.0.0.1:9999", "127.0.0.1",
                                  "192.0.2.1:8000", ""])
def test_a_host_that_is_not_the_listening_address_is_refused(client, host):
    """DNS rebinding: a foreign site's name, resolved to 127.0.0.1, comes with its own Host."""
    response = client.get("/options", headers={"host": host})
    assert response.status_code == 403 and "is not this server's address" in response.json()["detail"]


FOREIGN = [{"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"},
           {"origin": "http://evil.example", "sec-fetch-site": "cross-site"},
           {"origin": "http://127.0.0.1:3000", "sec-fetch-site": "same-site"},  # another server of this machine
           {"origin": "http://localhost:8000"},  # not the origin of a page at 127.0.0.1:8000
           {"origin": "null"}]  # a sandboxed frame, a file:// page


@pytest.mark.parametrize("headers", FOREIGN)
def test_a_run_sent_by_another_sites_page_is_refused_and_nothing_runs(client, headers):
    response = client.post("/run", headers=headers, **form(steps=1000))
    assert response.status_code == 403 and response.json()["detail"].startswith("only this server's own page")
    assert client.get("/status").json() == {"running": False}


def test_a_cancel_sent_by_another_sites_page_is_refused_and_the_run_goes_on(client):
    with client.stream("POST", "/run", **form(steps=1000)) as response:
        stream = events(response.iter_lines())
        next(e for e in stream if e[0] == "step")
        refused = client.post("/cancel", headers={"origin": "http://evil.example", "sec-fetch-site": "cross-site"})
        going_on = client.get("/status").json()
        client.post("/cancel")
        list(stream)
    assert refused.status_code == 403 and not going_on["cancelling"]


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000"])
def test_the_pages_own_run_passes(client, host):
    headers = {"host": host, "origin": f"http://{host}", "sec-fetch-site": "same-origin"}
    response = client.post("/run", headers=headers, **form(steps=1))
    assert response.status_code == 200 and "event: done" in response.text


def test_a_script_that_sends_no_origin_headers_may_cancel_on_loopback(client):
    assert client.post("/cancel").json() == {"cancelling": False}


def test_a_read_from_another_sites_page_is_not_refused(client):
    """Reads change nothing, and the browser hides their answer from that page (CORS)."""
    assert client.get("/options", headers={"origin": "http://evil.example", "sec-fetch-site": "cross-site"}).is_success


@pytest.fixture(scope="module")
def network(tiny, device):
    """The server on every address (--host 0.0.0.0) with the token s3cret, asked from another machine:
    a made-up address of the documentation range (RFC 5737); no packet leaves this one."""
    import app

    args = app.parse_args(["--host", "0.0.0.0", "--token", "s3cret", "--device", device])
    with TestClient(app.make_app(tiny, args), base_url="http://192.0.2.1:8000", client=("192.0.2.7", 50000)) as client:
        yield client


@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/options"), ("GET", "/status"), ("POST", "/cancel"),
                                          ("POST", "/run")])
@pytest.mark.parametrize("token", [None, "wrong", "s3cret_"])
def test_beyond_loopback_a_request_without_the_token_is_refused(network, method, path, token):
    network.cookies.clear()
    response = network.request(method, path, params={"token": token} if token else None)
    assert response.status_code == 403 and response.json()["detail"].startswith("this server needs its token")


def test_the_address_with_the_token_opens_the_page_which_keeps_it_in_a_cookie_for_its_requests(network):
    network.cookies.clear()
    page = network.get("/", params={"token": "s3cret"})
    assert page.status_code == 200 and "<canvas" in page.text
    cookie = page.headers["set-cookie"].lower()
    assert cookie.startswith("ldm_min_token_8000=s3cret;") and "httponly" in cookie and "samesite=strict" in cookie
    assert network.get("/options").status_code == 200  # the cookie, no ?token=
    assert run(network, steps=1)[-1][0] == "done"


def test_a_token_in_a_cookie_of_the_wrong_name_is_refused(network):
    network.cookies.clear()
    network.cookies.set("ldm_min_token_8001", "s3cret")  # another server's, on another port
    assert network.get("/options").status_code == 403


def test_on_every_address_any_host_name_with_the_token_is_served(network):
    network.cookies.clear()
    assert network.get("/options", params={"token": "s3cret"}, headers={"host": "mybox.lan:8000"}).status_code == 200


def test_beyond_loopback_a_random_token_is_made_at_each_start():
    import app

    first, second = (app.parse_args(["--host", host]).token for host in ("0.0.0.0", "192.0.2.1"))
    assert re.fullmatch("[0-9a-f]{48}", first) and re.fullmatch("[0-9a-f]{48}", second) and first != second


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_on_loopback_there_is_no_token_unless_one_is_set(host):
    import app

    assert app.parse_args(["--host", host]).token is None
    assert app.parse_args(["--host", host, "--token", "abc"]).token == "abc"


def test_token_sets_the_token_beyond_loopback():
    import app

    assert app.parse_args(["--host", "0.0.0.0", "--token", "abc"]).token == "abc"


def test_the_address_printed_beyond_loopback_carries_the_token():
    import app

    args = app.parse_args(["--host", "0.0.0.0", "--port", "8080"])
    assert app.address(args) == f"http://{socket.gethostname()}:8080/?token={args.token}"
    assert app.address(app.parse_args(["--host", "::1", "--token", "t"])) == "http://[::1]:8000/?token=t"


@pytest.mark.parametrize("token", ["", "two words", "a;b", "é"])
def test_a_token_an_address_or_cookie_would_escape_is_one_line_and_status_2(capsys, token):
    import app

    with pytest.raises(SystemExit) as exit:
        app.parse_args(["--token", token])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--token" in err and "letters, digits" in err and err.count("\n") == 1


def test_a_file_that_is_not_an_image_is_named_in_the_message(client):
    assert refused(client, image=("notes.txt", b"not a picture")) == (
        400, "image notes.txt: not an image file Pillow can read")


def test_a_mask_of_another_size_is_refused(client, tmp_path):
    Image.new("L", (64, 64), 255).save(tmp_path / "small.png")
    assert refused(client, mask=tmp_path / "small.png") == (
        400, "mask is 64x64 but image is 128x128: they must be the same size")


def test_an_empty_mask_is_refused(client, tmp_path):
    Image.new("L", (128, 128), 0).save(tmp_path / "empty.png")
    status, message = refused(client, mask=tmp_path / "empty.png")
    assert status == 400 and message.startswith("the mask marks no pixel to paint")


def test_an_upload_over_the_limit_is_refused_before_it_is_read(client):
    status, message = refused(client, image=("big.png", bytes(MAX_UPLOAD_MIB * 2**20 + 1)))
    assert status == 413 and f"over the {MAX_UPLOAD_MIB} MiB limit" in message


def test_an_option_that_is_not_a_number_is_refused(client):
    assert refused(client, steps="many") == (400, "steps must be a whole number, got 'many'")


def test_an_option_out_of_range_gets_options_own_message(client):
    assert refused(client, steps=0) == (400, "steps must be between 1 and 1000, got 0")


def test_a_seed_the_generator_cannot_take_is_refused_with_the_range(client):
    assert refused(client, seed="99999999999999999999") == (
        400, f"seed must be a whole number from 0 to {2**64 - 1}, got 99999999999999999999")


def test_a_prompt_over_77_tokens_is_said_to_be_cut(client):
    warnings = [data["message"] for name, data in run(client, steps=1, prompt="cat " * 80) if name == "warning"]
    assert warnings == ["the prompt is longer than 77 tokens; the text encoder reads only the first 77"]


def test_a_stroke_thinner_than_the_latent_grid_gets_the_warning_with_its_remedy(client, tmp_path):
    thin = np.zeros((128, 128), np.uint8)
    thin[40:90, 61:63] = 255  # 2 pixels wide, between the sampled pixels 56 and 64
    Image.fromarray(thin).save(tmp_path / "thin.png")
    warnings = [data["message"] for name, data in run(client, steps=1, mask=tmp_path / "thin.png") if name == "warning"]
    assert len(warnings) == 1 and "will not be repainted; use --latent-mask cover" in warnings[0]


def test_the_server_keeps_running_after_bad_input(client):
    refused(client, image=("notes.txt", b"not a picture"))
    assert run(client, steps=1)[-1][0] == "done"


def test_prompt_auto_is_the_captioners_caption_shown_before_the_steps(client, blip_words):
    names, data = zip(*run(client, steps=1, prompt="auto"))
    assert names[:3] == ("start", "caption", "step")
    assert set(data[1]["prompt"].split()) <= blip_words


def test_weights_that_cannot_load_are_one_line_and_status_2(capsys, tmp_path):
    import app
    import inpaint

    with pytest.raises(SystemExit) as exit:
        inpaint.run(["--weights", str(tmp_path / "nowhere")], main=app.main)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("option, message", [(["--port", "99999"], "--port must be from 1 to 65535, got 99999"),
                                             (["--max-upload", "0"], "--max-upload must be at least 1 (MiB), got 0")])
def test_a_port_or_upload_limit_out_of_range_is_one_line_and_status_2(capsys, option, message):
    import app
    import inpaint

    with pytest.raises(SystemExit) as exit:
        inpaint.run([*option, "--weights", "not/loaded"], main=app.main)
    assert exit.value.code == 2 and capsys.readouterr().err == f"error: {message} (see --help)\n"


def test_a_port_in_use_is_one_line_before_the_models_load(capsys):
    import app
    import inpaint

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as exit:
            inpaint.run(["--port", str(taken.getsockname()[1]), "--weights", "not/loaded"], main=app.main)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: --host/--port: Address already in use")
    assert err.count("\n") == 1


@contextlib.contextmanager
def served(tmp_path, *args):
    """`python app.py` on the tiny checkpoint and a free port, with its own temporary folder; its
    process and port. Stopped with Ctrl-C at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "tmp").mkdir()
    server = subprocess.Popen([sys.executable, "app.py", "--weights", str(GOLDEN / "tiny-sd"), "--device", "cpu",
                               "--port", str(port), *args], cwd=GOLDEN.parents[1], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    try:
        yield server, port
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)


def post_when_listening(url, **request):
    import httpx

    for _ in range(100):  # until it listens
        try:
            return httpx.post(url, timeout=60, **request)
        except httpx.ConnectError:
            time.sleep(0.1)


def test_the_server_prints_its_address_serves_runs_and_leaves_no_file_when_stopped(tmp_path):
    with served(tmp_path) as (server, port):
        assert server.stderr.readline() == f"open http://127.0.0.1:{port} (Ctrl-C stops)\n"
        response = post_when_listening(f"http://127.0.0.1:{port}/run", **form(steps=1))
        assert response.status_code == 200 and "event: done" in response.text
        assert [p.name.startswith("ldm_min_app_") for p in ours(tmp_path / "tmp")] == [True]
    assert server.returncode == 130 and server.stderr.read() == "stopped\n"  # Ctrl-C, as inpaint.py says it
    assert ours(tmp_path / "tmp") == []


def test_with_a_token_the_printed_address_carries_it_and_requests_need_it(tmp_path):
    with served(tmp_path, "--token", "t0k3n") as (server, port):
        assert server.stderr.readline() == f"open http://127.0.0.1:{port}/?token=t0k3n (Ctrl-C stops)\n"
        without = post_when_listening(f"http://127.0.0.1:{port}/cancel")
        with_it = post_when_listening(f"http://127.0.0.1:{port}/cancel?token=t0k3n")
    assert without.status_code == 403 and with_it.json() == {"cancelling": False}


def ours(folder):
    """What is in a temporary folder but PyTorch's own cache folder, which inpaint.py's runs make too."""
    return [p for p in folder.iterdir() if not p.name.startswith("torchinductor_")]


def test_preview_map_is_the_least_squares_fit_that_recovers_a_linear_decoder():
    """On a VAE whose decoder is a known per-pixel linear map of colour, the fitted map is that map."""
    import types

    import torch
    import torch.nn.functional as F

    import app

    torch.manual_seed(0)
    to_latent, to_rgb, bias = torch.randn(4, 3), torch.randn(4, 3), torch.randn(3)
    vae = types.SimpleNamespace(
        encode=lambda x: torch.einsum("bchw,dc->bdhw", F.avg_pool2d(x, 8), to_latent),
        decode=lambda z: F.interpolate(torch.einsum("bchw,cd->bdhw", z, to_rgb) + bias[:, None, None], scale_factor=8))
    P = app.fit_preview(types.SimpleNamespace(vae=vae, device=torch.device("cpu"), dtype=torch.float32))
    assert torch.allclose(P, torch.cat([to_rgb, bias[None]]), atol=1e-4)
