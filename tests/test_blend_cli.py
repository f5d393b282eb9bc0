"""inpaint.py --method blend on the tiny checkpoint: the API's blend in the written file, the paper's
defaults and options, folders and --batch, and one-line refusals of what means nothing for it."""
from pathlib import Path

import pytest
from PIL import Image

import inpaint
from ldm_min import Options, images
from ldm_min.pipeline import inpaint_tensors
from test_batch import grey_levels_apart

GOLDEN = Path(__file__).parent / "golden"
IMAGE, MASK = GOLDEN / "astronaut128.png", GOLDEN / "astronaut128_mask.png"


def test_the_file_is_the_apis_blend_with_the_same_seed(cli, tiny, tmp_path, device):
    status, err = cli(IMAGE, MASK, "--method", "blend", "--seed", 5, "-o", tmp_path / "out.png")
    assert status == 0, err
    assert f"blend, seed 5, 3 steps, eta 0.85, {device} float32" in err
    x, hole = images.prepare(Image.open(IMAGE), Image.open(MASK))
    expected = images.to_pil(inpaint_tensors(x, hole, tiny, Options(method="blend", steps=3, seed=5)).cpu())
    assert grey_levels_apart(Image.open(tmp_path / "out.png"), expected) == 0


def test_it_takes_the_papers_defaults_and_every_option_of_the_papers_method():
    args = ["i", "m", "--method", "blend"]
    assert inpaint.options_of(inpaint.parse_args(args)) == Options(method="blend")  # T = 30, eta = 0.85, d = 2
    given = ["--prompt", "a cat", "--eta", "0.3", "--guidance", "3", "--mask-dilate", "1", "--latent-mask", "cover",
             "--region", "full", "--region-margin", "64", "--paste-back", "--feather", "2"]
    assert inpaint.options_of(inpaint.parse_args(args + given)) == Options(
        method="blend", prompt="a cat", eta=0.3, guidance=3, dilate=1, latent_mask="cover", region="full",
        region_margin=64, paste_back=True, feather=2)


def test_a_folder_with_batch_writes_each_images_single_run_within_one_grey_level(cli, tmp_path):
    (tmp_path / "in").mkdir()
    for turn, name in enumerate(("a", "b")):
        Image.open(IMAGE).rotate(90 * turn).save(tmp_path / "in" / f"{name}.png")
    status, err = cli(tmp_path / "in", MASK, "--method", "blend", "--batch", 2, "-o", tmp_path / "done")
    assert status == 0 and "2 done, 0 failed" in err, err
    for name in ("a", "b"):
        status, err = cli(tmp_path / "in" / f"{name}.png", MASK, "--method", "blend", "-o", tmp_path / f"{name}.png")
        assert status == 0, err
        single, batched = Image.open(tmp_path / f"{name}.png"), Image.open(tmp_path / "done" / f"{name}.png")
        assert grey_levels_apart(batched, single) <= 1


@pytest.mark.parametrize("option", [["--adm-weights", "f"], ["--travel-length", "5"], ["--travel-repeat", "2"]])
def test_ddnms_options_are_refused_with_blend_in_one_line(cli, tmp_path, option):
    status, err = cli(IMAGE, MASK, "--method", "blend", "-o", tmp_path / "out.png", *option)
    assert status == 2 and err.count("\n") == 1 and f"{option[0]} means nothing with --method blend" in err, err
    assert not (tmp_path / "out.png").exists()

