"""benchmarks/table1.py --method blend: the blend of z_t on the same crops, masks, seeds, weights and
options as ours, beside ours in the same OUT, resumable and under torchrun, on the tiny checkpoint."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ldm_min import Options, inpaint
from test_table1 import needs_fidelity, one_thread  # noqa: F401 (a fixture)
from test_table1_ddnm import (COMMON, TINY, data, harness, rerun_changes_nothing, results, row_with_fid,  # noqa: F401
                              table1, torchrun)

OURS = ["--weights", str(TINY), "--steps", "2", *COMMON]
BLEND = ["--method", "blend", *OURS]


@pytest.fixture(scope="module")
def both(data, tmp_path_factory, one_thread):
    """One OUT with ours, then the blend added, on one thread as each torchrun process below."""
    out = tmp_path_factory.mktemp("both") / "out"
    for args in (OURS, BLEND):
        table1.main(["--data", str(data), "--out", str(out), "--no-fid", *args])
    return out


def test_the_blend_writes_beside_ours_and_settings_say_so(both):
    for n, name in enumerate(["a", "b"]):
        assert (both / "inpainted" / "hole168" / f"{n:04d}_{name}.png").is_file()    # ours
        assert (both / "inpainted" / "blend" / "hole168" / f"{n:04d}_{name}.png").is_file()
    settings = json.loads((both / "settings.json").read_text())
    assert settings["blend"] is True and settings["options"]["steps"] == 2 and "method" not in settings["options"]


def test_a_blend_result_is_inpaint_with_method_blend_of_the_saved_crop_and_mask_with_the_jobs_seed(both, tiny_cpu):
    n, seed = 1, 1  # one hole size: job k = n, seed 0 + k, as for ours
    crop = next((both / "crops").glob(f"{n:04d}_*.png"))
    expected = inpaint(Image.open(crop), Image.open(both / "masks" / "hole168.png"), tiny_cpu,
                       Options(method="blend", steps=2, seed=seed))
    result = Image.open(both / "inpainted" / "blend" / "hole168" / crop.name)
    assert np.array_equal(np.asarray(result), np.asarray(expected))


def test_the_table_shows_the_blend_measured_beside_ours_and_the_papers_rows(capsys, both, data):
    status, stdout, err = harness(capsys, data, both, *BLEND, "--no-fid", "--dataset", "bsds500")
    assert status == 0, err
    header, _, row = stdout.splitlines()
    assert header.startswith("| dataset | hole | images | DDNM (paper) | proposed (paper) | ours | blend (measured) |"
                             " s/image | blend s/image |")
    assert row.startswith("| BSDS500 | 168x168 | 2 | 59.54 | 56.57 | - | - |")
    [saved] = json.loads((both / "table1.json").read_text())["rows"]
    assert saved["blend_fid"] is None and saved["blend_seconds_per_image"] > 0


def test_a_blend_rerun_does_no_work_and_leaves_ours_alone(capsys, both, data, tmp_path):
    assert rerun_changes_nothing(capsys, both, data, tmp_path, *BLEND)


def test_the_blend_with_other_options_than_ours_in_the_same_out_is_refused(capsys, both, data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(both, out)
    status, _, err = harness(capsys, data, out, *BLEND, "--no-fid", "--steps", "3")
    assert status == 2 and err.count("\n") == 1 and "steps 2" in err, err


@pytest.mark.parametrize("extra", [["--adm-weights", "f"], ["--prompts", "original"], ["--captioner", "c"]])
def test_options_that_mean_nothing_for_the_blend_are_refused_in_one_line(capsys, data, tmp_path, extra):
    status, _, err = harness(capsys, data, tmp_path / "out", *BLEND, *extra)
    assert status == 2 and err.count("\n") == 1 and f"{extra[0]} means nothing with --method blend" in err, err
    assert not (tmp_path / "out").exists()


def test_two_gloo_processes_under_torchrun_write_the_single_runs_bytes(both, data, tmp_path):
    run = torchrun(data, tmp_path / "out", *BLEND)
    assert run.returncode == 0, run.stderr[-2000:]
    assert results(tmp_path / "out", "blend") == results(both, "blend") and len(results(both, "blend")) == 2


@needs_fidelity
def test_fid_of_both_methods_is_measured(capsys, both, data, tmp_path, monkeypatch):
    row = row_with_fid(capsys, both, data, tmp_path, monkeypatch, *BLEND)
    assert np.isfinite(row["fid"]) and np.isfinite(row["blend_fid"]) and row["fid"] != row["blend_fid"]
