"""inpaint.py end to end on the tiny checkpoint: outputs, options, and one-line errors for bad input."""
import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
TINY = GOLDEN / "tiny-sd"
IMAGE, MASK = GOLDEN / "astronaut128.png", GOLDEN / "astronaut128_mask.png"


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_default_output_is_image_stem_inpainted_png_here(cli, device, tmp_path):
    status, err = cli(IMAGE, MASK)
    assert status == 0, err
    assert Image.open(tmp_path / "astronaut128_inpainted.png").size == (128, 128)
    assert f"seed 0, 3 steps, eta 0.85, {device} float32" in err and "astronaut128_inpainted.png" in err


@pytest.mark.parametrize("run", ["run_a", "run_b", "run_c"])
def test_cli_reproduces_golden_run(cli, expected, runs, run):
    r = runs[run]
    status, err = cli(GOLDEN / r["image"], GOLDEN / r["mask"], "-o", "out.png", "--prompt", r["prompt"],
                      "--guidance", r["guidance"], "--steps", r["steps"], "--eta", r["eta"], "--seed", r["seed"],
                      "--mask-dilate", r["dilate"])
    assert status == 0, err
    assert np.abs(pixels("out.png") - expected[f"{run}.image_uint8"].numpy()).max() <= 1


def test_quiet_prints_nothing(cli):
    assert cli(IMAGE, MASK, "--quiet") == (0, "")


def test_same_seed_gives_the_same_bytes(cli):
    cli(IMAGE, MASK, "-o", "a.png", "--seed", "5")
    cli(IMAGE, MASK, "-o", "b.png", "--seed", "5")
    assert open("a.png", "rb").read() == open("b.png", "rb").read()


def test_another_seed_gives_another_picture(cli):
    cli(IMAGE, MASK, "-o", "a.png", "--seed", "5")
    cli(IMAGE, MASK, "-o", "b.png", "--seed", "6")
    assert np.abs(pixels("a.png") - pixels("b.png")).max() > 10


def test_invert_mask_is_the_same_as_an_inverted_mask_file(cli):
    Image.fromarray(255 - np.asarray(Image.open(MASK).convert("L"))).save("inverted.png")
    cli(IMAGE, "inverted.png", "--invert-mask", "-o", "a.png")
    cli(IMAGE, MASK, "-o", "b.png")
    assert open("a.png", "rb").read() == open("b.png", "rb").read()


@pytest.mark.parametrize("feather", [0, 3])
def test_paste_back_keeps_the_original_pixels_away_from_the_hole(cli, feather):
    cli(IMAGE, MASK, "-o", "plain.png")
    cli(IMAGE, MASK, "-o", "pasted.png", "--paste-back", "--feather", feather)
    hole = np.asarray(Image.open(MASK).convert("L")) >= 128
    near = hole.copy()  # within `feather` pixels (chessboard distance) of the hole
    for _ in range(feather):
        grown = np.pad(near, 1)
        near = np.max([grown[i:i + 128, j:j + 128] for i in range(3) for j in range(3)], axis=0)
    original, pasted, plain = pixels(IMAGE.as_posix()), pixels("pasted.png"), pixels("plain.png")
    assert np.array_equal(pasted[~near], original[~near])
    assert np.array_equal(pasted[hole], plain[hole])
    assert not np.array_equal(plain[~near], original[~near])  # without it, the VAE changes known pixels


def test_odd_image_size_comes_back_at_its_size(cli):
    Image.open(IMAGE).resize((100, 76)).save("odd.png")
    Image.open(MASK).resize((100, 76)).save("odd_mask.png")
    assert cli("odd.png", "odd_mask.png")[0] == 0
    assert Image.open("odd_inpainted.png").size == (100, 76)


def test_whole_image_hole_is_allowed_and_said_to_be_unconditional(cli):
    Image.new("L", (128, 128), 255).save("all.png")
    status, err = cli(IMAGE, "all.png", "-o", "out.png")
    assert status == 0 and Image.open("out.png").size == (128, 128)
    assert err.count("unconditional generation") == 1


def test_a_big_photo_says_which_region_was_inpainted(cli):
    Image.open(IMAGE).resize((1000, 800)).save("big.png")
    mask = Image.new("L", (1000, 800))
    mask.paste(255, (600, 300, 640, 340))
    mask.save("big_mask.png")
    status, err = cli("big.png", "big_mask.png", "--steps", "1")
    assert status == 0 and "region 512x512 at (364, 64), scaled 1.00x" in err
    assert Image.open("big_inpainted.png").size == (1000, 800)


def test_region_full_and_auto_write_the_same_file_for_a_small_image(cli):
    cli(IMAGE, MASK, "-o", "auto.png")
    cli(IMAGE, MASK, "-o", "full.png", "--region", "full")
    assert open("auto.png", "rb").read() == open("full.png", "rb").read()


def test_thin_strokes_are_one_warning_line_and_cover_paints_them(cli):
    stroke = np.zeros((128, 128), np.uint8)
    stroke[:, 3] = 255
    Image.fromarray(stroke).save("stroke.png")
    status, err = cli(IMAGE, "stroke.png", "-o", "nearest.png")
    assert status == 0 and "warning: 128 of 128 hole pixels (100%) fall between the 8-pixel latent grid" in err
    status, err = cli(IMAGE, "stroke.png", "-o", "cover.png", "--latent-mask", "cover")
    assert status == 0 and "warning" not in err
    assert not np.array_equal(pixels("nearest.png"), pixels("cover.png"))


def write(name, make):
    make(name)
    return name


NO_WEIGHTS = ("--weights", "./no-weights")  # the last flag wins: an error about these comes only if they load
BAD = {
    "missing image": (lambda: ["nope.png", MASK], r"image not found: nope.png"),
    "missing mask": (lambda: [IMAGE, "nope.png"], r"mask not found: nope.png"),
    "not an image": (lambda: [write("a.png", lambda n: open(n, "w").write("hello")), MASK], r"a.png: not an image"),
    "truncated image": (lambda: [write("t.png", lambda n: open(n, "wb").write(IMAGE.read_bytes()[:3000])), MASK],
                        r"t.png: damaged or truncated"),
    "mask size differs": (lambda: [IMAGE, write("m.png", lambda n: Image.new("L", (64, 32), 255).save(n))],
                          r"mask is 64x32 but image is 128x128"),
    "mask without hole": (lambda: [IMAGE, write("m.png", lambda n: Image.new("L", (128, 128), 127).save(n))],
                          r"no pixel to paint: white .* --invert-mask"),
    "tiny image": (lambda: [write("s.png", lambda n: Image.new("RGB", (7, 20)).save(n)),
                            write("m.png", lambda n: Image.new("L", (7, 20), 255).save(n))], r"at least 8 pixels"),
    "steps 0": (lambda: [IMAGE, MASK, "--steps", "0"], r"steps must be between 1 and 1000"),
    "steps 1001": (lambda: [IMAGE, MASK, "--steps", "1001"], r"steps must be between 1 and 1000"),
    # settings that cannot work: refused before the weights are even looked for
    "negative eta": (lambda: [IMAGE, MASK, "--eta", "-0.5", *NO_WEIGHTS], r"eta must be between 0 and 1, got -0.5"),
    "eta above 1": (lambda: [IMAGE, MASK, "--eta", "1.5", *NO_WEIGHTS], r"eta must be between 0 and 1, got 1.5"),
    "infinite eta": (lambda: [IMAGE, MASK, "--eta", "inf", *NO_WEIGHTS], r"eta must be a finite number, got inf"),
    "nan guidance": (lambda: [IMAGE, MASK, "--prompt", "a cat", "--guidance", "nan", *NO_WEIGHTS],
                     r"guidance must be a finite number, got nan"),
    "infinite guidance": (lambda: [IMAGE, MASK, "--guidance", "inf", *NO_WEIGHTS],
                          r"guidance must be a finite number, got inf"),
    "seed past 64 bits": (lambda: [IMAGE, MASK, "--seed", "99999999999999999999", *NO_WEIGHTS],
                          rf"seed must be a whole number from 0 to {2**64 - 1}, got 99999999999999999999"),
    "negative seed": (lambda: [IMAGE, MASK, "--seed", "-1", *NO_WEIGHTS], r"seed must be a whole number from 0 to"),
    "32-bit float image out of range": (lambda: [write("f.tiff", lambda n: Image.new("F", (128, 128), 2.0).save(n)),
                                                 MASK], r"image: a 32-bit float picture must hold values from 0 to 1"),
    "negative dilation": (lambda: [IMAGE, MASK, "--mask-dilate", "-1"], r"dilation must be >= 0"),
    "negative feather": (lambda: [IMAGE, MASK, "--paste-back", "--feather", "-2"], r"feather must be >= 0"),
    "unknown latent mask rule": (lambda: [IMAGE, MASK, "--latent-mask", "any"], r"invalid choice: 'any'"),
    "region margin too wide": (lambda: [IMAGE, MASK, "--region-margin", "300"], r"region margin must be between"),
    "unknown device": (lambda: [IMAGE, MASK, "--device", "tpu"], r"unknown device 'tpu'"),
    "unknown dtype": (lambda: [IMAGE, MASK, "--dtype", "int8"], r"unknown dtype 'int8'"),
    "float16 on cpu": (lambda: [IMAGE, MASK, "--device", "cpu", "--dtype", "float16"], r"bfloat16"),
    "output is input": (lambda: [IMAGE, MASK, "-o", IMAGE], r"is an input file: refusing to overwrite"),
    "missing output folder": (lambda: [IMAGE, MASK, "-o", "no/such/dir/out.png"], r"output folder no/such/dir"),
    "unknown output format": (lambda: [IMAGE, MASK, "-o", "out.xyz"], r"unknown image format '.xyz'"),
    "missing weights": (lambda: [IMAGE, MASK, "--weights", "./no-weights"], r"no such folder"),
}
if not torch.cuda.is_available():
    BAD["cuda without gpu"] = (lambda: [IMAGE, MASK, "--device", "cuda"], r"no CUDA GPU")


def digest(folder):
    """Every file under folder and its contents' hash."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, case):
    make_args, message = BAD[case]
    args = make_args()
    before, golden = digest(tmp_path), digest(GOLDEN)
    status, err = cli(*args)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert digest(tmp_path) == before and digest(GOLDEN) == golden  # no output, no input changed


def test_pickle_only_weights_are_refused_by_the_cli(cli, tmp_path):
    import shutil

    folder = shutil.copytree(TINY, tmp_path / "w")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.bin")
    status, err = cli(IMAGE, MASK, weights=folder)
    assert status == 2 and "safetensors" in err and not (tmp_path / "astronaut128_inpainted.png").exists()


def test_weights_that_make_nan_are_one_line_exit_2_and_write_nothing(cli, nan_weights, tmp_path):
    status, err = cli(IMAGE, MASK, "--quiet", weights=nan_weights)
    assert status == 2 and err == ("error: sampling produced inf/NaN in float32: the model itself gave non-finite "
                                   "values: corrupt weights, or an extreme guidance?\n")
    assert os.listdir(tmp_path) == []


def test_too_large_image_is_refused_before_sampling(cli, monkeypatch):
    import ldm_min.models

    monkeypatch.setattr(ldm_min.models, "available_memory", lambda device: 2**20)
    status, err = cli(IMAGE, MASK)
    assert status == 2 and "GiB of memory" in err and "make the image smaller" in err


def test_a_crash_while_writing_leaves_no_file(cli, tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cli(IMAGE, MASK)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_exits_cleanly_and_leaves_no_file(tmp_path):
    args = [sys.executable, str(ROOT / "inpaint.py"), str(IMAGE), str(MASK), "--weights", str(TINY), "--steps", "1000"]
    proc = subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "step 2/" not in seen:  # wait until sampling runs
        seen += proc.stderr.read(1)
        assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().endswith("interrupted: nothing was written")
    assert os.listdir(tmp_path) == []


def test_a_real_process_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "inpaint.py"), "missing.png", str(MASK)], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "error: image not found: missing.png\n"
