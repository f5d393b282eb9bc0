"""inpaint.py on folders: each output is the single-image run's, reruns resume, bad files fail alone;
with --batch N, images of one size share each UNet call and each result is still its single run's."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_min import NonFiniteError, Options, images
from ldm_min.pipeline import inpaint_batch, inpaint_tensors
from ldm_min.unet import UNet


ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
TINY = GOLDEN / "tiny-sd"
NAMES = ["a.png", "b.jpg", "c.png"]


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """imgs/ with three pictures (one a JPEG) and masks/ with a mask of each name, in a fresh folder."""
    monkeypatch.chdir(tmp_path)
    photo, mask = Image.open(GOLDEN / "astronaut128.png").convert("RGB"), Image.open(GOLDEN / "astronaut128_mask.png")
    for folder in ("imgs", "masks"):
        (tmp_path / folder).mkdir()
    for turn, name in enumerate(NAMES):
        photo.rotate(90 * turn).save(tmp_path / "imgs" / name)
        mask.rotate(90 * turn).save(tmp_path / "masks" / f"{Path(name).stem}.png")
    return tmp_path


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def grey_levels_apart(a, b):
    """The largest difference between two pictures (PIL, or tensors in [-1, 1]), in grey levels."""
    pixels = lambda p: np.asarray(p if isinstance(p, Image.Image) else images.to_pil(p), np.int16)
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture
def unet_batches(monkeypatch):
    """The batch size of every UNet call, in order."""
    sizes, forward = [], UNet.forward
    recording = lambda self, z, t, context: sizes.append(len(z)) or forward(self, z, t, context)
    monkeypatch.setattr(UNet, "forward", recording)
    return sizes


def test_each_output_is_what_the_single_image_command_writes(cli, folders):
    status, err = cli("imgs", "masks", "-o", "out")
    assert status == 0 and "3 done, 0 failed -> out" in err
    assert sorted(files("out")) == ["a.png", "b.png", "c.png"]
    for name in NAMES:
        stem = Path(name).stem
        assert cli(f"imgs/{name}", f"masks/{stem}.png", "-o", f"{stem}_single.png")[0] == 0
        assert files("out")[f"{stem}.png"] == Path(f"{stem}_single.png").read_bytes()


def test_pictures_of_other_sizes_in_one_folder_each_get_their_single_run(cli, tmp_path, monkeypatch):
    # One process, one model: an odd latent side first (the upsamplers' plain path), then an even one.
    monkeypatch.chdir(tmp_path)
    photo, mask = Image.open(GOLDEN / "astronaut128.png").convert("RGB"), Image.open(GOLDEN / "astronaut128_mask.png")
    for folder in ("imgs", "masks"):
        (tmp_path / folder).mkdir()
    for name, box in (("a.png", (20, 30, 108, 102)), ("b.png", (0, 0, 128, 128))):  # 88x72: latents 11x9
        photo.crop(box).save(tmp_path / "imgs" / name)
        mask.crop(box).save(tmp_path / "masks" / name)
    status, err = cli("imgs", "masks", "-o", "out")
    assert status == 0 and "2 done, 0 failed -> out" in err
    for name in ("a.png", "b.png"):
        assert cli(f"imgs/{name}", f"masks/{name}", "-o", f"single_{name}")[0] == 0
        assert files("out")[name] == Path(f"single_{name}").read_bytes()


def test_a_rerun_does_no_work_and_overwrite_redoes_it(cli, folders):
    cli("imgs", "masks", "-o", "out")
    written = {p.name: p.stat().st_mtime_ns for p in Path("out").iterdir()}
    status, err = cli("imgs", "masks", "-o", "out")
    assert status == 0 and "0 done, 0 failed, 3 already there" in err
    assert {p.name: p.stat().st_mtime_ns for p in Path("out").iterdir()} == written
    status, err = cli("imgs", "masks", "-o", "out", "--overwrite")
    assert status == 0 and "3 done" in err


@pytest.mark.parametrize("batch", ["1", "3"])  # 3: a, b, b2 and c, d
def test_a_bad_image_or_a_missing_mask_fails_alone_in_one_line(cli, folders, batch):
    Path("imgs/b2.png").write_text("not a picture")  # between b and c
    Image.open("imgs/a.png").save("imgs/d.png")  # no mask named d
    status, err = cli("imgs", "masks", "-o", "out", "--quiet", "--batch", batch)
    assert status == 1
    assert err.count("error: ") == 2 and "b2.png" in err and "no single mask named d.*" in err
    assert "3 done, 2 failed: see above" in err
    assert sorted(files("out")) == ["a.png", "b.png", "c.png"]


def test_one_mask_serves_every_image(cli, folders):
    status, _ = cli("imgs", "masks/a.png", "-o", "out")
    assert status == 0
    cli("imgs/c.png", "masks/a.png", "-o", "single.png")
    assert files("out")["c.png"] == Path("single.png").read_bytes()


@pytest.mark.parametrize("args, message", [(["imgs", "masks", "-o", "imgs"], "is an input folder"),
                                           (["imgs", "nowhere", "-o", "out"], "mask not found"),
                                           (["imgs", "masks", "-o", "out", "--eta", "1.5"],
                                            "eta must be between 0 and 1"),
                                           (["imgs", "masks", "-o", "out", "--guidance", "nan"],
                                            "guidance must be a finite number"),
                                           (["imgs", "masks", "-o", "out", "--batch", "0"],
                                            "invalid number of images '0'")])
def test_bad_folder_runs_are_one_line_and_write_nothing(cli, folders, args, message):
    before = files("imgs")
    status, err = cli(*args)
    assert status == 2 and err.count("\n") == 1 and message in err
    assert files("imgs") == before and not Path("out").exists()


def test_two_images_with_one_name_are_refused(cli, folders):
    Image.open("imgs/a.png").save("imgs/a.jpg")
    status, err = cli("imgs", "masks", "-o", "out")
    assert status == 2 and "a.jpg and a.png would both be written as a.png" in err


@pytest.mark.parametrize("batch", ["1", "2"])  # 2: the batches a, b and c, shared out whole
def test_one_and_two_processes_under_torchrun_write_the_same_files(folders, batch):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads per process: the same float rounding
    # On the CPU (gloo) whatever the test device: two NCCL processes would need two GPUs.
    args = ["imgs", "masks", "--weights", str(TINY), "--steps", "2", "--quiet", "--device", "cpu", "--batch", batch]
    for out, procs in (("one", "1"), ("two", "2")):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                            str(ROOT / "inpaint.py"), *args, "-o", out], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
    assert files("one") == files("two") and len(files("one")) == 3


def test_a_batch_shares_each_unet_call_by_size_and_writes_each_single_result_within_one_grey_level(
        cli, folders, unet_batches):
    Image.open("imgs/a.png").resize((96, 128)).save("imgs/e.png")  # another size: a batch of its own
    Image.open("masks/a.png").resize((96, 128)).save("masks/e.png")
    assert cli("imgs", "masks", "-o", "one")[0] == 0
    assert unet_batches == [1] * 3 * 4  # 3 steps an image
    unet_batches.clear()
    status, err = cli("imgs", "masks", "-o", "batched", "--batch", "4")
    assert status == 0 and "4 done, 0 failed" in err
    assert unet_batches == [3] * 3 + [1] * 3  # a, b, c together, then e
    assert sorted(files("batched")) == sorted(files("one")) == ["a.png", "b.png", "c.png", "e.png"]
    for name in files("one"):
        assert grey_levels_apart(Image.open(f"one/{name}"), Image.open(f"batched/{name}")) <= 1, name


def test_a_batched_rerun_does_only_the_missing_images(cli, folders):
    assert cli("imgs", "masks", "-o", "out", "--batch", "3")[0] == 0
    Path("out/b.png").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in Path("out").iterdir()}
    status, err = cli("imgs", "masks", "-o", "out", "--batch", "3")
    assert status == 0 and "1 done, 0 failed, 2 already there" in err
    assert {name: Path("out", name).stat().st_mtime_ns for name in kept} == kept and Path("out/b.png").is_file()


@pytest.fixture(scope="module")
def astronaut():
    """The golden picture and its hole, as `images.prepare` gives them."""
    return images.prepare(Image.open(GOLDEN / "astronaut128.png"), Image.open(GOLDEN / "astronaut128_mask.png"))


def test_a_guided_batch_gives_each_image_its_prompt_and_seed_within_one_grey_level(tiny_cpu, astronaut, unet_batches):
    x, hole = astronaut
    pictures = [(x, hole, Options(prompt=prompt, steps=3, seed=seed))
                for prompt, seed in [("a cat", 1), ("a dog", 2), ("the blue sky", 3)]]
    results = inpaint_batch(pictures, tiny_cpu)
    assert unet_batches == [2 * 3] * 3  # the unconditional and the conditional half of each image, in one call
    for (x, hole, options), result in zip(pictures, results):
        assert grey_levels_apart(result, inpaint_tensors(x, hole, tiny_cpu, options)) <= 1


def test_an_image_that_samples_to_nan_fails_alone_in_its_batch(tiny_cpu, astronaut):
    x, hole = astronaut
    bad = x.clone()
    bad[..., 0, 0] = float("nan")  # a known pixel: E(y), and from there every latent, goes NaN
    pictures = [(x, hole, Options(steps=2, seed=1)), (bad, hole, Options(steps=2, seed=2)),
                (x, hole, Options(steps=2, seed=3))]
    first, failed, last = inpaint_batch(pictures, tiny_cpu)
    assert isinstance(failed, NonFiniteError)
    for result, (x, hole, options) in ((first, pictures[0]), (last, pictures[2])):
        assert grey_levels_apart(result, inpaint_tensors(x, hole, tiny_cpu, options)) <= 1
