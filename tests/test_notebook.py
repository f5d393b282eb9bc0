"""notebooks/algorithm1.ipynb: every code cell runs, in order, on the tiny checkpoint, and draws
pictures of the expected sizes, with DDNM's ADM file and without it (its cells then step aside); it
walks Algorithm 1 by hand, each line checked against sample()'s own value; its prose cites
equations (1)-(6), lines 1-8 of Algorithm 1 and the paper's three typos; it is committed with the
outputs of a run, in order. No Jupyter needed: the .ipynb is plain JSON."""
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "algorithm1.ipynb"
TINY = ROOT / "tests" / "golden" / "tiny-sd"


def cells(kind):
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == kind]


def run_cells(sources, cwd, monkeypatch, settings=None, printed=None):
    """Execute the sources in order in one namespace, as a kernel would, from `cwd`; `settings`
    overrides values of the notebook's first code cell (its settings) right after it runs. What the
    cells print goes to the list `printed`, if given, a line an item."""
    monkeypatch.setenv("LDM_MIN_WEIGHTS", str(TINY))
    monkeypatch.chdir(cwd)
    namespace = {"__name__": "__main__", "display": lambda *objects: None}
    if printed is not None:
        namespace["print"] = lambda *words, **_: printed.append(" ".join(map(str, words)))
    for n, source in enumerate(sources):
        exec(compile(source, f"{NOTEBOOK.name}[code cell {n}]", "exec"), namespace)
        if n == 0:
            assert settings is None or settings.keys() <= namespace.keys(), "unknown setting"
            namespace.update(settings or {})
    return namespace


def sheet_size(ns, cols, rows, panel):
    """The size of a sheet made by the notebook's tile(): `rows` x `cols` panels of size `panel`."""
    gap, label = ns["GAP"], ns["LABEL_H"]
    return gap + cols * (panel[0] + gap), gap + rows * (label + panel[1] + gap)


@pytest.fixture(scope="module")
def ns(tiny_adm):
    with pytest.MonkeyPatch.context() as monkeypatch:
        # 5 steps instead of the paper's 30, to stay fast on a busy CPU: fewer than SHOW_STEPS (6),
        # so the step strip has one column per step. DDNM, on a reduced random ADM: 2 steps, 2 calls.
        monkeypatch.setenv("LDM_MIN_ADM_WEIGHTS", str(tiny_adm))
        return run_cells(cells("code"), ROOT, monkeypatch, settings={"STEPS": 5, "DDNM_STEPS": 2})


def test_runs_and_draws_expected_sizes(ns):
    from PIL import Image

    w, h = Image.open(ROOT / ns["IMAGE"]).size
    assert (w, h) == (128, 128) and ns["RESIZE_TO"] is None  # the default photo
    zoom, mask_zoom = ns["ZOOM"], ns["MASK_ZOOM"]
    assert (zoom, mask_zoom) == (2, 4)
    panel = (w * zoom, h * zoom)
    steps, shown = ns["STEPS"], min(ns["SHOW_STEPS"], ns["STEPS"])
    expected = {
        "input": sheet_size(ns, 3, 1, panel),
        "forward": sheet_size(ns, len(ns["forward_ts"]), 2, panel),
        "eq3": sheet_size(ns, 3, 1, panel),
        "eq4": sheet_size(ns, 3, 1, panel),
        "masks": sheet_size(ns, 4, 1, (w * mask_zoom, h * mask_zoom)),  # 128 is a multiple of 8: no padding
        "Ey": sheet_size(ns, 3 + 4, 1, panel),  # y, D(E(y)), D(M_l E(y)), 4 latent channels
        "projections": sheet_size(ns, 3, 3, panel),  # eq. 4, eq. 5, the blend: each guess, projection and result
        "steps": sheet_size(ns, shown, 2, panel),
        "result": sheet_size(ns, 5, 1, panel),
        "eq4_eq5": sheet_size(ns, 4, 2, (256, 256)),  # DDNM's 256 window: eq. 4 over eq. 5, and each result
    }
    figures = ns["figures"]
    assert set(figures) == set(expected)
    for name, size in expected.items():
        assert isinstance(figures[name], Image.Image) and figures[name].mode == "RGB", name
        assert figures[name].size == size, name

    # The run itself: one callback per step, the latent shapes of a 128x128 photo, and inpaint()
    # reproducing the step-by-step result exactly on the CPU.
    assert len(ns["record"]) == steps == 5 and shown == 5
    assert [t for t, _, _, _ in ns["record"]] == [t for t, _ in ns["schedule"].timesteps(steps)]
    assert tuple(ns["record"][0][1].shape) == (1, 4, h // 8, w // 8)
    assert len(ns["shown"]) == shown and ns["shown"][0] == 0 and ns["shown"][-1] == steps - 1
    assert tuple(ns["x_0"].shape) == (1, 3, h, w)
    assert ns["result"].size == ns["pasted"].size == (w, h)
    assert ns["inpaint_diff"] == 0
    # Eq. 4 beside eq. 5 on the photo at 256: every DDNM call and Algorithm 1 step seen, DDNM exact where known.
    assert len(ns["ddnm_trace"]) == 2 and len(ns["latent_trace"]) == steps and ns["ddnm_known_diff"] == 0
    assert ns["negative"] > 0  # the printed sigma_t makes a square root imaginary somewhere
    # The dilation exists because of cut cells that count as known without it.
    assert ((ns["cut"]) & (ns["M_l0"] > 0)).any() and not ((ns["cut"]) & (ns["M_l"] > 0)).any()


def test_pictures_that_need_trained_weights_say_so_under_random_ones(ns):
    assert ns["RANDOM_WEIGHTS"]
    assert set(ns["captions"]) == {"forward", "eq3", "eq4", "Ey", "steps", "result", "eq4_eq5", "projections"}
    assert all(c.startswith("Random weights: ") and "v1.4 weights: " in c for c in ns["captions"].values())


def test_the_blend_runs_every_step_and_ends_on_e_y_where_known(ns):
    assert len(ns["blend_trace"]) == ns["STEPS"] and ns["blend_known_exact"]


def test_without_the_adms_file_ddnm_steps_aside_in_one_line_and_the_rest_runs(monkeypatch):
    """A learner with the SD weights only: no LDM_MIN_ADM_WEIGHTS, and no file in the repository root."""
    assert not (ROOT / "256x256_diffusion_uncond.pt").exists()
    monkeypatch.delenv("LDM_MIN_ADM_WEIGHTS", raising=False)
    printed = []
    ns = run_cells(cells("code"), ROOT, monkeypatch, settings={"STEPS": 2}, printed=printed)
    skipped = [line for line in printed if line.startswith("DDNM")]
    assert len(skipped) == 1 and skipped[0].startswith("DDNM skipped: ") and "LDM_MIN_ADM_WEIGHTS" in skipped[0]
    assert "eq4_eq5" not in ns["figures"] and {"steps", "result"} <= ns["figures"].keys()
    assert ns["inpaint_diff"] == 0 and "adm" not in ns


@pytest.mark.parametrize("steps, eta", [(3, 0.85), (1, 0.85), (2, 0.0)])
def test_the_hand_walk_checks_every_line_of_the_first_and_last_iteration(monkeypatch, steps, eta):
    """Lines 3-5 of the first iteration, lines 3-5 and 7 of the last, each equal to sample()'s; and
    the paper's abar_0 = 1 puts E(y) itself in z_0's known latents (checked in the notebook's cells)."""
    printed = []
    ns = run_cells(cells("code"), ROOT, monkeypatch, settings={"STEPS": steps, "ETA": eta}, printed=printed)
    checked = [line.split(":")[0] for line in printed if ": equals sample()'s" in line]
    assert checked == ["line 3, z_0|t", "line 4, zhat_0|t", "line 5, z_t-1",
                       "line 3, z_0|t", "line 4, zhat_0|t", "line 5, z_0", "line 7, x_0 = D(z_0)"]
    assert len(ns["eps_z"]) == (steps if eta > 0 else 0)
    assert torch.equal(ns["D"](ns["z_0_config"]), ns["x_0"])


def test_the_hand_walk_fails_when_sample_departs_from_the_formulas(monkeypatch):
    """The hand-walked cells compare, not copy: a sampler that skips eq. 5 is caught at line 4."""
    import ldm_min
    from ldm_min.blend import blend

    monkeypatch.setattr(ldm_min, "sample", blend)  # the notebook imports `sample` from ldm_min
    with pytest.raises(AssertionError, match="line 4"):
        run_cells(cells("code"), ROOT, monkeypatch, settings={"STEPS": 2})


def test_a_named_adm_file_that_is_missing_is_the_loaders_error(monkeypatch, tmp_path):
    from ldm_min import WeightsError

    monkeypatch.setenv("LDM_MIN_ADM_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsError, match="missing.pt"):
        run_cells(cells("code"), ROOT, monkeypatch, settings={"STEPS": 1})


def test_finds_the_repository_from_notebooks_folder(monkeypatch):
    """In Jupyter the working folder is notebooks/: the setup cells must still find the repository."""
    code = cells("code")
    setup = next(n for n, source in enumerate(code) if "ROOT = " in source)
    ns = run_cells(code[:setup + 1], ROOT / "notebooks", monkeypatch)
    assert ns["ROOT"] == ROOT.resolve()


def test_prose_cites_the_paper_and_its_three_typos():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    prose = "\n".join(cells("markdown"))
    for n in range(1, 7):
        assert re.search(rf"[Ee]quations? \({n}\)|[Ee]quations \(\d\) (and|to) \({n}\)", prose), f"equation ({n})"
    for n in range(1, 9):
        assert re.search(rf"\b[Ll]ines? {n}\b", prose), f"line {n} of Algorithm 1"
    assert len(re.findall(r"[Tt]ypo of the printed paper", prose)) == 3  # abar's product, sigma_t's last factor, A^+ A y
    try:
        import nbformat
    except ImportError:
        return
    nbformat.validate(nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4))


def test_is_committed_with_every_code_cells_outputs_in_execution_order():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    for n, c in enumerate(code):
        assert c["outputs"], f"code cell {n} has no output"
        assert all(o["output_type"] in ("stream", "display_data") for o in c["outputs"]), f"code cell {n} failed"
        assert all(o.get("name") != "stderr" for o in c["outputs"]), f"code cell {n} stored a warning of its machine"
    shown = sum("image/jpeg" in o.get("data", {}) for c in code for o in c["outputs"])
    assert shown == 9  # every figure of a run without the ADM's file (the stored one), once


def stored_text(cell):
    return "".join("".join(o["text"]) for o in cell["outputs"] if o["output_type"] == "stream")


def test_committed_outputs_that_need_no_trained_weights_are_what_the_code_prints_now(monkeypatch):
    """The schedule's numbers, sigma's typo and the hand-walked checks: a change to the code that
    moves them without a new run of the notebook fails here."""
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) for c in code]
    table = next(n for n, source in enumerate(sources) if "with the printed sigma" in source)
    for n in (table - 1, table):  # abar_t, then the T = 30 timesteps with sigma_t, printed and as printed
        printed, stored = [], stored_text(code[n]).splitlines()
        run_cells(sources[:n + 1], ROOT, monkeypatch, printed=printed)
        assert printed[-len(stored):] == stored, f"code cell {n}"
    checks = [line for c in code for line in stored_text(c).splitlines() if ": equals sample()'s" in line]
    assert len(checks) == 7
    from ldm_min import ddnm, sample
    for function in (sample, ddnm.ddnm):  # the listings of Algorithm 1 and of DDNM, as their files are now
        assert any(inspect.getsource(function) in stored_text(c) for c in code), function.__name__
