"""benchmarks/table1.py on the tiny checkpoint: the protocol's crops and masks, outputs equal to
inpaint(), 1 vs 2 torchrun processes, resuming, one-line errors, and FID offline."""
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "golden" / "tiny-sd"
sys.path.insert(0, str(ROOT / "benchmarks"))
import table1  # noqa: E402

SIZES = {"a.png": (600, 520), "sub/b.jpg": (520, 700)}  # sorted: a.png is image 0, sub/b.jpg image 1
needs_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                    reason="torch-fidelity is not installed (requirements-eval.txt)")
ARGS = ["--weights", str(TINY), "--steps", "2", "--masks", "168,136", "--device", "cpu", "--quiet"]


def harness(capsys, data, out, *extra):
    """table1.py in this process; returns (exit status, stdout, stderr)."""
    try:
        table1.run(["--data", str(data), "--out", str(out), *ARGS, *map(str, extra)])
        status = 0
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        (folder / name).parent.mkdir(exist_ok=True)
        smooth = Image.fromarray(rng.integers(0, 256, (h // 20, w // 20, 3), dtype=np.uint8)).resize((w, h))
        smooth.save(folder / name, quality=95)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One thread, as each torchrun process has: the same arithmetic in every run compared here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory, one_thread):
    """One complete single-process run, --no-fid: 2 images x 2 holes."""
    out = tmp_path_factory.mktemp("reference") / "out"
    try:
        table1.run(["--data", str(data), "--out", str(out), *ARGS, "--no-fid"])
    except SystemExit as e:
        pytest.fail(f"harness exited {e.code}")
    return out


def files(out):
    """Every picture under OUT by name, but the temporary files a killed run may leave (".*")."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))
            if not p.name.startswith(".")}


def mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*")}


def test_crops_are_short_side_512_bicubic_then_centre_512(data, reference):
    a, b = Image.open(data / "a.png").convert("RGB"), Image.open(data / "sub/b.jpg").convert("RGB")
    expected = {"0000_a.png": a.resize((591, 512), Image.Resampling.BICUBIC).crop((39, 0, 551, 512)),   # 600x520
                "0001_b.png": b.resize((512, 689), Image.Resampling.BICUBIC).crop((0, 88, 512, 600))}  # 520x700
    assert sorted(p.name for p in (reference / "crops").iterdir()) == sorted(expected)
    for name, image in expected.items():
        crop = Image.open(reference / "crops" / name)
        assert crop.size == (512, 512) and crop.mode == "RGB"
        assert np.array_equal(np.asarray(crop), np.asarray(image))


@pytest.mark.parametrize("side, start", [(168, 172), (136, 188)])
def test_masks_are_centred_white_squares_to_the_pixel(reference, side, start):
    mask = Image.open(reference / "masks" / f"hole{side}.png")
    assert mask.mode == "L" and mask.size == (512, 512)
    expected = np.zeros((512, 512), np.uint8)
    expected[start:start + side, start:start + side] = 255
    assert np.array_equal(np.asarray(mask), expected)


@pytest.mark.parametrize("n, side, seed", [(0, 168, 0), (1, 136, 3)])  # job k = n * 2 + j: seed 0 + k
def test_output_is_inpaint_of_the_saved_crop_and_mask_with_seed_base_plus_k(reference, tiny_cpu, n, side, seed):
    from ldm_min import Options, inpaint

    crop = next((reference / "crops").glob(f"{n:04d}_*.png"))
    expected = inpaint(Image.open(crop), Image.open(reference / "masks" / f"hole{side}.png"), tiny_cpu,
                       Options(steps=2, seed=seed))
    result = Image.open(reference / "inpainted" / f"hole{side}" / crop.name)
    assert np.array_equal(np.asarray(result), np.asarray(expected))


def test_two_gloo_processes_under_torchrun_write_the_same_bytes(data, reference, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "benchmarks" / "table1.py"), "--data", str(data), "--out", str(out),
                          *(a for a in ARGS if a != "--quiet"), "--no-fid"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "inpainting 4/4 [" in run.stderr  # rank 0 counts both ranks' jobs
    assert "cpu float32 x2" in (out / "table1.md").read_text()
    assert files(out) == files(reference) and len(files(out)) == 2 + 2 + 4


def test_a_batched_run_writes_the_single_runs_within_one_grey_level(capsys, data, reference, tmp_path, one_thread):
    out = tmp_path / "out"
    status, _, err = harness(capsys, data, out, "--no-fid", "--batch", "3")  # jobs 0-2 together, then job 3
    assert status == 0, err
    batched, single = files(out), files(reference)
    assert sorted(batched) == sorted(single)
    for name in single:
        a, b = (np.asarray(Image.open(io.BytesIO(f[name])), np.int16) for f in (batched, single))
        assert np.abs(a - b).max() <= (1 if name.startswith("inpainted") else 0), name


def test_a_rerun_does_no_work(capsys, data, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = mtimes(out)
    status, stdout, err = harness(capsys, data, out, "--no-fid")
    assert status == 0, err
    after = mtimes(out)
    assert {p: t for p, t in after.items() if p.suffix == ".png"} == {p: t for p, t in before.items()
                                                                      if p.suffix == ".png"}
    assert "| other | 168x168 | 2 |" in stdout


def test_limit_takes_the_first_images_in_the_same_out(capsys, data, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = mtimes(out)
    status, stdout, err = harness(capsys, data, out, "--no-fid", "--limit", "1")
    assert status == 0, err
    assert "| other | 136x136 | 1 |" in stdout
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.suffix == ".png")


def test_an_interrupted_run_finishes_on_rerun(capsys, data, reference, tmp_path, one_thread, monkeypatch):
    """The last job is cut by Ctrl-C (after a killed run left a temporary file beside it): the run
    says so on one line, exit 130, keeps every output; the rerun does that job only."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    missing = out / "inpainted" / "hole136" / "0001_b.png"
    missing.unlink()
    (missing.parent / ".0001_b.png.partial.png").write_bytes(b"\x89PNG half")
    before = mtimes(out)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(table1, "inpaint_batch", ctrl_c)
        status, _, err = harness(capsys, data, out, "--no-fid")
    assert status == 130 and err.startswith("interrupted") and err.count("\n") == 1, err
    assert mtimes(out) == before
    status, _, err = harness(capsys, data, out, "--no-fid")
    assert status == 0, err
    assert files(out) == files(reference)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.suffix == ".png" and p.exists())


def one_line_error(status, err):
    return status == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("case", ["empty folder", "mask 512", "mask 0", "unreadable image", "missing list entry",
                                  "last seed past 64 bits"])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    extra = ["--no-fid"]
    if case == "mask 512":
        extra += ["--masks", "168,512"]
    if case == "mask 0":
        extra += ["--masks", "0"]
    if case == "unreadable image":
        (data / "broken.png").write_bytes(b"not a picture")
    if case == "missing list entry":
        (tmp_path / "list.txt").write_text("a.png\n")
        extra += ["--list", tmp_path / "list.txt"]
    if case == "last seed past 64 bits":  # job 0 takes seed 2^64 - 1, job 1 one more: refused before any work
        Image.new("RGB", (512, 512)).save(data / "a.png")
        extra += ["--seed", 2**64 - 1]
    status, _, err = harness(capsys, data, tmp_path / "out", *extra)
    assert one_line_error(status, err), (status, err)
    assert case != "last seed past 64 bits" or ("seed must be" in err and not (tmp_path / "out" / "crops").exists())


def test_out_with_another_runs_settings_is_refused_and_kept(capsys, data, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = files(out), (out / "settings.json").read_text()
    status, _, err = harness(capsys, data, out, "--no-fid", "--steps", "3")
    assert one_line_error(status, err) and "steps 2" in err, err
    assert (files(out), (out / "settings.json").read_text()) == before


def test_missing_inception_weights_are_one_line_before_any_work(capsys, data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    status, _, err = harness(capsys, data, tmp_path / "out")
    assert one_line_error(status, err) and "--no-fid" in err, err
    assert not (tmp_path / "out").exists()


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    """Features whose sample mean and covariance are exactly mu and Q diag(d) Q^T: then FID is
    |mu_a - mu_b|^2 + sum (sqrt(d_a) - sqrt(d_b))^2."""
    rng = np.random.default_rng(1)
    n, dim = 50, 6
    Q = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    # n x dim, columns orthonormal and orthogonal to the ones vector: sample covariance exactly I.
    white = np.linalg.qr(np.column_stack([np.ones(n), rng.normal(size=(n, dim))]))[0][:, 1:] * np.sqrt(n - 1)
    d_a, d_b = rng.uniform(0.5, 4, dim), rng.uniform(0.5, 4, dim)
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    features_a = mu_a + white @ np.diag(np.sqrt(d_a)) @ Q.T
    features_b = mu_b + white[::-1] @ np.diag(np.sqrt(d_b)) @ Q.T
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(d_a) - np.sqrt(d_b)) ** 2)
    assert table1.fid(features_a, features_b) == pytest.approx(expected, rel=1e-9)
    assert table1.fid(features_a, features_a) == pytest.approx(0, abs=1e-9)


def random_inception_file(monkeypatch, torch_home):
    """torch-fidelity's Inception with random weights, saved where the harness reads the real file."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    Inception = table1.inception_class()
    with monkeypatch.context() as m:  # build it without loading any weights
        m.setattr(sys.modules[Inception.__module__], "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: None)
        state = Inception("random", ["2048"]).state_dict()
    gen = torch.Generator().manual_seed(0)
    for name, value in state.items():
        if value.dim() > 1:  # He-scaled convolutions keep the activations alive through 90-odd layers
            value.copy_(torch.randn(value.shape, generator=gen) * (2 / value[0].numel()) ** 0.5)
        elif name.endswith("running_var"):
            value.fill_(1)
    path = table1.inception_weights_file()
    path.parent.mkdir(parents=True)
    torch.save(state, path)


@needs_fidelity
def test_fid_runs_offline_with_the_librarys_inception_from_a_local_file(capsys, data, reference, tmp_path,
                                                                         monkeypatch):
    random_inception_file(monkeypatch, tmp_path / "torch")
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    status, stdout, err = harness(capsys, data, out, "--dataset", "bsds500")
    assert status == 0, err
    rows = json.loads((out / "table1.json").read_text())["rows"]
    assert [(r["hole"], r["paper_ddnm"], r["paper_proposed"]) for r in rows] == [(168, 59.54, 56.57),
                                                                                  (136, 43.83, 39.90)]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in rows)
    assert f"| BSDS500 | 168x168 | 2 | 59.54 | 56.57 | {rows[0]['fid']:.2f} |" in stdout
    assert (out / "table1.md").read_text() == stdout
