"""inpaint.py on folders: each output is the single-image run's, reruns resume, bad files fail alone."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


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


def test_each_output_is_what_the_single_image_command_writes(cli, folders):
    status, err = cli("imgs", "masks", "-o", "out")
    assert status == 0 and "3 done, 0 failed -> out" in err
    assert sorted(files("out")) == ["a.png", "b.png", "c.png"]
    for name in NAMES:
        stem = Path(name).stem
        assert cli(f"imgs/{name}", f"masks/{stem}.png", "-o", f"{stem}_single.png")[0] == 0
        assert files("out")[f"{stem}.png"] == Path(f"{stem}_single.png").read_bytes()


def test_a_rerun_does_no_work_and_overwrite_redoes_it(cli, folders):
    cli("imgs", "masks", "-o", "out")
    written = {p.name: p.stat().st_mtime_ns for p in Path("out").iterdir()}
    status, err = cli("imgs", "masks", "-o", "out")
    assert status == 0 and "0 done, 0 failed, 3 already there" in err
    assert {p.name: p.stat().st_mtime_ns for p in Path("out").iterdir()} == written
    status, err = cli("imgs", "masks", "-o", "out", "--overwrite")
    assert status == 0 and "3 done" in err


def test_a_bad_image_or_a_missing_mask_fails_alone_in_one_line(cli, folders):
    Path("imgs/b2.png").write_text("not a picture")  # between b and c
    Image.open("imgs/a.png").save("imgs/d.png")  # no mask named d
    status, err = cli("imgs", "masks", "-o", "out", "--quiet")
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
                                            "guidance must be a finite number")])
def test_bad_folder_runs_are_one_line_and_write_nothing(cli, folders, args, message):
    before = files("imgs")
    status, err = cli(*args)
    assert status == 2 and err.count("\n") == 1 and message in err
    assert files("imgs") == before and not Path("out").exists()


def test_two_images_with_one_name_are_refused(cli, folders):
    Image.open("imgs/a.png").save("imgs/a.jpg")
    status, err = cli("imgs", "masks", "-o", "out")
    assert status == 2 and "a.jpg and a.png would both be written as a.png" in err


def test_one_and_two_processes_under_torchrun_write_the_same_files(folders):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads per process: the same float rounding
    # On the CPU (gloo) whatever the test device: two NCCL processes would need two GPUs.
    args = ["imgs", "masks", "--weights", str(TINY), "--steps", "2", "--quiet", "--device", "cpu"]
    for out, procs in (("one", "1"), ("two", "2")):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                            str(ROOT / "inpaint.py"), *args, "-o", out], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
    assert files("one") == files("two") and len(files("one")) == 3
