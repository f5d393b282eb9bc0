"""inpaint.py --method ddnm on a reduced random ADM: DDNM's exact consistency in the written file,
its own defaults, folders, and one-line refusals of what means nothing for it."""
import numpy as np
import pytest
import torch
from PIL import Image

import inpaint
from ldm_min import ddnm, images
from ldm_min.options import DdnmOptions
from weights import load_adm


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 256x320 photo (smooth colours) and a mask with a 90x120 hole and a thin stroke."""
    folder = tmp_path_factory.mktemp("photo")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).resize((320, 256)).save(folder / "a.png")
    mask = np.zeros((256, 320), np.uint8)
    mask[80:170, 100:220] = 255
    mask[10:12, 250:300] = 255
    Image.fromarray(mask).save(folder / "a_mask.png")
    return folder / "a.png", folder / "a_mask.png"


@pytest.fixture
def run(capsys, device, tiny_adm):
    """inpaint.py --method ddnm in this process, 2 steps, on the test device in float32; returns (status, stderr)."""
    def call(*args):
        try:
            inpaint.run(["--method", "ddnm", "--adm-weights", str(tiny_adm), "--steps", "2", "--device", device,
                         "--dtype", "float32", *map(str, args)])
            status = 0
        except SystemExit as e:
            status = e.code
        return status, capsys.readouterr().err
    return call


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def test_the_known_pixels_of_the_written_result_are_the_inputs_exactly(run, photo, tmp_path, device):
    image, mask = photo
    status, err = run(image, mask, "-o", tmp_path / "out.png")
    assert status == 0, err
    out, original, hole = pixels(tmp_path / "out.png"), pixels(image), np.asarray(Image.open(mask)) >= 128
    assert np.array_equal(out[~hole], original[~hole])
    assert (out[hole] != original[hole]).any(axis=-1).mean() > 0.9
    # 256x320: windows at left 0 and 64, both holding hole; 2 steps walk 2 calls each, no time travel
    assert "4 UNet calls (4 with every window sampled)" in err and f"{device} float32" in err


def test_the_file_is_the_apis_inpaint_ddnm_with_the_same_seed(run, photo, tmp_path, tiny_adm, device):
    image, mask = photo
    status, err = run(image, mask, "-o", tmp_path / "out.png", "--seed", "5")
    assert status == 0, err
    x, hole = images.prepare(Image.open(image), Image.open(mask))
    expected = ddnm.inpaint_ddnm(x, hole, load_adm(tiny_adm, "cpu", "float32"), DdnmOptions(steps=2, seed=5))
    difference = np.abs(pixels(tmp_path / "out.png") - np.asarray(images.to_pil(expected.cpu()), np.int16))
    assert difference.max() <= (0 if device == "cpu" else 2)  # on a GPU: the CPU's picture within float error


def test_a_folder_gives_each_images_single_run(run, photo, tmp_path):
    image, mask = photo
    (tmp_path / "in").mkdir()
    for name in ("b", "c"):
        (tmp_path / "in" / f"{name}.png").write_bytes(image.read_bytes())
    status, err = run(tmp_path / "in", mask, "-o", tmp_path / "done", "--quiet")
    assert status == 0, err
    status, err = run(image, mask, "-o", tmp_path / "single.png", "--quiet")
    assert status == 0, err
    for name in ("b", "c"):
        assert np.array_equal(pixels(tmp_path / "done" / f"{name}.png"), pixels(tmp_path / "single.png"))


def test_steps_default_to_25_for_ddnm_and_30_for_the_papers_method():
    assert inpaint.parse_args(["i", "m", "--method", "ddnm", "--adm-weights", "f"]).steps == DdnmOptions().steps == 25
    assert inpaint.parse_args(["i", "m"]).steps == 30
    args = inpaint.parse_args(["i", "m", "--method", "ddnm", "--adm-weights", "f", "--travel-length", "5"])
    assert inpaint.options_of(args) == DdnmOptions(travel_length=5)


def one_line_exit_2(status, err, *words):
    return status == 2 and err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words)


@pytest.mark.parametrize("option", [["--prompt", "a boat"], ["--prompt", "auto"], ["--captioner", "x"],
                                    ["--eta", "0.5"], ["--guidance", "3"], ["--mask-dilate", "1"],
                                    ["--latent-mask", "cover"], ["--region", "full"], ["--region-margin", "64"],
                                    ["--paste-back"], ["--feather", "4"], ["--weights", "w"], ["--tokenizer", "t"],
                                    ["--compile"], ["--batch", "2"]])
def test_options_meaningless_for_ddnm_are_refused_in_one_line(run, photo, tmp_path, option):
    status, err = run(*photo, "-o", tmp_path / "out.png", *option)
    assert one_line_exit_2(status, err, option[0], "means nothing with --method ddnm"), err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("option", [["--adm-weights", "f"], ["--travel-length", "5"], ["--travel-repeat", "2"]])
def test_ddnms_options_are_refused_with_the_papers_method(cli, photo, tmp_path, option):
    status, err = cli(*photo, "-o", tmp_path / "out.png", *option)
    assert one_line_exit_2(status, err, option[0], "means nothing with --method paper"), err


@pytest.mark.parametrize("option, words", [([], ["needs --adm-weights"]),
                                           (["--adm-weights", "f", "--travel-length", "0"], ["travel length"]),
                                           (["--adm-weights", "f", "--travel-repeat", "99999999999999999999"],
                                            ["travel repeat must be between 1 and 10"]),
                                           (["--adm-weights", "f", "--seed", str(2**64)], ["seed", str(2**64 - 1)]),
                                           (["--adm-weights", "f", "--steps", "0"], ["steps"])])
def test_ddnm_without_weights_or_with_bad_settings_is_refused(capsys, photo, option, words):
    with pytest.raises(SystemExit) as e:
        inpaint.run([*map(str, photo), "--method", "ddnm", *option])
    assert one_line_exit_2(e.value.code, capsys.readouterr().err, *words)


def test_an_image_under_256_pixels_is_refused_before_the_weights_load(capsys, tmp_path):
    Image.new("RGB", (200, 300)).save(tmp_path / "small.png")
    Image.new("L", (200, 300), 255).save(tmp_path / "mask.png")
    with pytest.raises(SystemExit) as e:
        inpaint.run([str(tmp_path / "small.png"), str(tmp_path / "mask.png"), "--method", "ddnm", "--adm-weights",
                     str(tmp_path / "missing.pt"), "-o", str(tmp_path / "out.png")])
    assert one_line_exit_2(e.value.code, capsys.readouterr().err, "200x300", "at least 256")
    assert not (tmp_path / "out.png").exists()


def test_the_seed_gives_the_cpus_picture_on_the_test_device(photo, tiny_adm, device):
    x, hole = images.prepare(*map(Image.open, photo))
    on = lambda where: ddnm.inpaint_ddnm(x, hole, load_adm(tiny_adm, where, "float32"), DdnmOptions(steps=2)).cpu()
    cpu = on("cpu")
    other = cpu if device == "cpu" else on(device)
    grey = np.abs(np.asarray(images.to_pil(other), np.int16) - np.asarray(images.to_pil(cpu), np.int16))
    assert grey.max() <= 2 and torch.isfinite(other).all()
