"""app.py through FastAPI's test client: a run streamed step by step, its result the command line's,
cancel, busy, and a clear message for each bad input."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
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


def test_start_carries_the_latent_mask_on_its_8x8_grid(client, expected):
    (name, start), *_ = run(client, steps=1)
    assert name == "start"
    grid = np.array([[c == "1" for c in row] for row in start["grid"]])
    assert (grid == (expected["mask.out.latent_known_dilate2"][0, 0].numpy() == 1)).all()


@pytest.mark.parametrize("options", [{}, {"seed": 5, "eta": 0.3, "dilate": 1, "latent_mask": "cover",
                                          "paste_back": "true", "feather": 2, "prompt": "a cat", "guidance": 3}])
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


def test_the_server_prints_its_address_serves_runs_and_leaves_no_file_when_stopped(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "tmp").mkdir()
    server = subprocess.Popen([sys.executable, "app.py", "--weights", str(GOLDEN / "tiny-sd"), "--device", "cpu",
                               "--port", str(port)], cwd=GOLDEN.parents[1], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    try:
        assert server.stderr.readline() == f"open http://127.0.0.1:{port} (Ctrl-C stops)\n"
        import httpx

        for _ in range(100):  # until it listens
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/run", timeout=60, **form(steps=1))
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert response.status_code == 200 and "event: done" in response.text
        assert [p.name.startswith("ldm_min_app_") for p in ours(tmp_path / "tmp")] == [True]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    assert server.returncode == 130 and server.stderr.read() == "stopped\n"  # Ctrl-C, as inpaint.py says it
    assert ours(tmp_path / "tmp") == []


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
