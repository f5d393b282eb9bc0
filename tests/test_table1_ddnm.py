"""benchmarks/table1.py --method ddnm: DDNM on the same crops, masks and seeds as ours, beside ours
in the same OUT, resumable and under torchrun, on a reduced random ADM (conftest's `tiny_adm`)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_min import ddnm, images
from ldm_min.options import DdnmOptions
from test_table1 import needs_fidelity, random_inception_file
from weights import load_adm

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "golden" / "tiny-sd"
sys.path.insert(0, str(ROOT / "benchmarks"))
import table1  # noqa: E402

COMMON = ["--masks", "168", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 512x512 pictures (each crop is the picture itself), smooth colours."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((512, 512)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def ddnm_args(tiny_adm):
    """1 step: one UNet call a window, 4 windows a picture (Table 1's holes)."""
    return ["--method", "ddnm", "--adm-weights", str(tiny_adm), "--steps", "1", *COMMON]


def harness(capsys, data, out, *args):
    """table1.py in this process on DATA into OUT: (exit status, stdout, stderr)."""
    try:
        table1.run([str(a) for a in ("--data", data, "--out", out, *args)])
    except SystemExit as e:
        return (e.code, *capsys.readouterr())
    return (0, *capsys.readouterr())


@pytest.fixture(scope="module")
def both(data, ddnm_args, tmp_path_factory):
    """One OUT with ours (the tiny SD checkpoint, 2 steps), then DDNM added: (OUT, the table printed)."""
    out = tmp_path_factory.mktemp("both") / "out"
    for args in (["--weights", str(TINY), "--steps", "2", *COMMON], ddnm_args):
        table1.main(["--data", str(data), "--out", str(out), "--no-fid", *args])
    return out


def mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}


def test_ddnm_writes_beside_ours_with_both_settings_kept(both):
    for n, name in enumerate(["a", "b"]):
        assert (both / "inpainted" / "hole168" / f"{n:04d}_{name}.png").is_file()    # ours
        assert (both / "inpainted" / "ddnm" / "hole168" / f"{n:04d}_{name}.png").is_file()
    settings = json.loads((both / "settings.json").read_text())
    assert settings["options"]["steps"] == 2 and settings["weights"] == str(TINY.resolve())
    assert settings["ddnm"]["steps"] == 1 and settings["ddnm"]["travel_length"] == DdnmOptions().travel_length


def test_a_ddnm_result_is_inpaint_ddnm_of_the_saved_crop_and_mask_with_the_jobs_seed(both, tiny_adm):
    n, seed = 1, 1  # one hole size: job k = n, seed 0 + k, as for ours
    crop = next((both / "crops").glob(f"{n:04d}_*.png"))
    x, hole = images.prepare(Image.open(crop), Image.open(both / "masks" / "hole168.png"))
    expected = ddnm.inpaint_ddnm(x, hole, load_adm(tiny_adm, "cpu", "float32"), DdnmOptions(steps=1, seed=seed))
    result = np.asarray(Image.open(both / "inpainted" / "ddnm" / "hole168" / crop.name))
    assert np.array_equal(result, np.asarray(images.to_pil(expected)))
    known = ~(hole[0, 0].numpy().astype(bool))
    assert np.array_equal(result[known], np.asarray(Image.open(crop))[known])


def test_the_table_shows_ddnm_measured_beside_ours_and_the_papers_rows(capsys, both, data, ddnm_args):
    status, stdout, err = harness(capsys, data, both, *ddnm_args, "--no-fid", "--dataset", "bsds500")
    assert status == 0, err
    header, _, row = stdout.splitlines()
    assert header.startswith("| dataset | hole | images | DDNM (paper) | proposed (paper) | ours | DDNM (measured) |")
    assert row.startswith("| BSDS500 | 168x168 | 2 | 59.54 | 56.57 | - | - |")
    assert "| 4 (all windows: 9) |" in row  # 1 step a window: 4 windows sampled of the fork's 9
    [saved] = json.loads((both / "table1.json").read_text())["rows"]
    assert saved["ddnm_unet_calls"] == [4, 9] and saved["ddnm_seconds_per_image"] > 0


def rerun_changes_nothing(capsys, both, data, tmp_path, *args):
    """A rerun of `args` on a copy of the finished OUT `both`: whether it succeeds and leaves every file as it was."""
    out = tmp_path / "out"
    shutil.copytree(both, out)
    before = mtimes(out)
    status, _, err = harness(capsys, data, out, *args, "--no-fid")
    return status == 0 and mtimes(out) == before


def test_a_ddnm_rerun_does_no_work_and_leaves_ours_alone(capsys, both, data, ddnm_args, tmp_path):
    assert rerun_changes_nothing(capsys, both, data, tmp_path, *ddnm_args)


def test_an_interrupted_ddnm_run_finishes_on_rerun(capsys, both, data, ddnm_args, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(both, out)
    missing = out / "inpainted" / "ddnm" / "hole168" / "0001_b.png"
    missing.unlink()
    status, _, err = harness(capsys, data, out, *ddnm_args, "--no-fid")
    assert status == 0, err
    assert missing.read_bytes() == (both / "inpainted" / "ddnm" / "hole168" / "0001_b.png").read_bytes()


def test_ddnm_with_other_ddnm_settings_in_the_same_out_is_refused(capsys, both, data, ddnm_args, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(both, out)
    status, _, err = harness(capsys, data, out, *ddnm_args, "--no-fid", "--steps", "2")
    assert status == 2 and err.count("\n") == 1 and "ddnm steps 1" in err, err


@pytest.mark.parametrize("extra, flag", [(["--prompts", "original"], "--prompts"), (["--batch", "2"], "--batch"),
                                         (["--weights", "w"], "--weights")])
def test_options_of_the_papers_method_are_refused_with_ddnm(capsys, data, ddnm_args, tmp_path, extra, flag):
    status, _, err = harness(capsys, data, tmp_path / "out", *ddnm_args, *extra)
    assert status == 2 and err.count("\n") == 1 and f"{flag} means nothing with --method ddnm" in err, err
    assert not (tmp_path / "out").exists()


def torchrun(data, out, *args):
    """table1.py on DATA into OUT, --no-fid, under torchrun: two gloo processes of one thread each.
    Returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "benchmarks" / "table1.py"), "--data", str(data), "--out", str(out), *args,
                           "--no-fid"], capture_output=True, text=True, env=env, timeout=300)


def results(out, method):
    """The bytes of each of a method's results in OUT, by name."""
    return {p.name: p.read_bytes() for p in sorted((out / "inpainted" / method / "hole168").glob("*.png"))}


def row_with_fid(capsys, both, data, tmp_path, monkeypatch, *args):
    """The table's one row when table1.py with `args` reruns a copy of BOTH with FID, from a random Inception."""
    random_inception_file(monkeypatch, tmp_path / "torch")
    out = tmp_path / "out"
    shutil.copytree(both, out)
    status, _, err = harness(capsys, data, out, *args)
    assert status == 0, err
    [row] = json.loads((out / "table1.json").read_text())["rows"]
    return row


def test_two_gloo_processes_under_torchrun_write_the_single_runs_bytes(both, data, ddnm_args, tmp_path):
    run = torchrun(data, tmp_path / "out", *ddnm_args)
    assert run.returncode == 0, run.stderr[-2000:]
    assert results(tmp_path / "out", "ddnm") == results(both, "ddnm") and len(results(both, "ddnm")) == 2


@needs_fidelity
def test_fid_of_both_methods_is_measured(capsys, both, data, ddnm_args, tmp_path, monkeypatch):
    row = row_with_fid(capsys, both, data, tmp_path, monkeypatch, *ddnm_args)
    assert np.isfinite(row["fid"]) and np.isfinite(row["ddnm_fid"]) and row["fid"] != row["ddnm_fid"]
