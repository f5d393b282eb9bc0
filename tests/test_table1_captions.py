"""benchmarks/table1.py --prompts: BLIP captions of the original or the masked crop as prompts, on
the tiny checkpoint and the tiny random-weight BLIP of conftest.py (`blip`), one 512x512 image."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "golden" / "tiny-sd"
sys.path.insert(0, str(ROOT / "benchmarks"))
import table1  # noqa: E402

ARGS = ["--weights", str(TINY), "--steps", "2", "--masks", "168", "--device", "cpu", "--quiet", "--no-fid"]
HOLE = slice(172, 340)  # the 168-pixel hole of a 512x512 crop


def harness(out, data, *extra):
    """table1.py in this process; fails the test on a non-zero exit."""
    try:
        table1.run(["--data", str(data), "--out", str(out), *ARGS, *map(str, extra)])
    except SystemExit as e:
        pytest.fail(f"harness exited {e.code}")


def picture(folder, hole_noise=None):
    """One 512x512 image (so its crop is itself): smooth colours, and noise in the hole if asked."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((512, 512))).copy()
    if hole_noise is not None:
        pixels[HOLE, HOLE] = np.random.default_rng(hole_noise).integers(0, 256, (168, 168, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    return folder


class Spy:
    """Counts loads of the captioner and keeps every picture its processor is given."""

    def __init__(self, monkeypatch):
        self.loads, self.seen = 0, []
        real = weights.load_captioner

        def load(*args, **kwargs):
            self.loads += 1
            model, processor = real(*args, **kwargs)
            return model, self.wrap(processor)

        monkeypatch.setattr(weights, "load_captioner", load)

    def wrap(self, processor):
        spy = self

        class Recording:
            def __call__(self, **kwargs):
                spy.seen.append(np.asarray(kwargs["images"]).copy())
                return processor(**kwargs)

            def decode(self, *args, **kwargs):
                return processor.decode(*args, **kwargs)

        return Recording()


def no_inpainting(monkeypatch):
    """The SD models are neither loaded nor run (the tiny model takes seconds a job on the CPU): each
    "result" is its crop, and the Options of every job are kept, in order. test_table1.py checks
    the real outputs against inpaint() for the Options the harness passes."""
    calls = []

    def fake(pictures, models):
        calls.extend(options for _, _, options in pictures)
        return [x for x, _, _ in pictures]

    monkeypatch.setattr(table1, "load_models", lambda *args, **kwargs: None)
    monkeypatch.setattr(table1, "inpaint_batch", fake)
    return calls


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, blip):
    """One complete run with the three prompt kinds: 1 image x 1 hole x 3 kinds."""
    with pytest.MonkeyPatch.context() as m:
        spy, calls = Spy(m), no_inpainting(m)
        base = tmp_path_factory.mktemp("captioned")
        harness(base / "out", picture(base / "data"), "--prompts", "none,original,masked", "--captioner", blip)
    spy.calls = calls
    return base / "out", spy


def test_caption_files_per_kind_and_hole_are_written_with_one_captioner_load(captioned, blip_words):
    out, spy = captioned
    assert sorted(p.name for p in (out / "captions").iterdir()) == ["masked_hole168.json", "original.json"]
    for name in ["masked_hole168.json", "original.json"]:
        captions = json.loads((out / "captions" / name).read_text())
        assert list(captions) == ["0000_a.png"] and set(captions["0000_a.png"].split()) <= blip_words
    assert spy.loads == 1 and len(spy.seen) == 2
    assert json.loads((out / "settings.json").read_text())["prompts"] == ["none", "original", "masked"]
    assert sorted(p.relative_to(out).as_posix() for p in (out / "inpainted").rglob("*.png")) == [
        "inpainted/hole168/0000_a.png", "inpainted/masked/hole168/0000_a.png", "inpainted/original/hole168/0000_a.png"]


def test_a_rerun_reuses_the_captions_and_never_loads_the_captioner(captioned, blip, tmp_path, monkeypatch):
    out = shutil.copytree(captioned[0], tmp_path / "out")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")
              if p.suffix in (".png", ".json") and p.name != "table1.json"}
    spy, calls = Spy(monkeypatch), no_inpainting(monkeypatch)
    harness(out, picture(tmp_path / "data"),
            "--prompts", "none,original,masked", "--captioner", blip)
    assert spy.loads == 0 and calls == []
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_each_prompt_kind_is_inpainted_with_its_caption_guided_and_the_jobs_seed(captioned):
    from ldm_min import Options

    out, spy = captioned
    caption = lambda kind: json.loads(table1.Layout(out, ["a.png"]).captions(kind, 168).read_text())["0000_a.png"]
    assert spy.calls == [Options(steps=2, seed=0), Options(prompt=caption("original"), steps=2, seed=0),
                         Options(prompt=caption("masked"), steps=2, seed=0)]
    assert caption("original") and caption("masked") and spy.calls[1].guidance == 7.5
    crop = np.asarray(Image.open(out / "crops" / "0000_a.png"))  # what the stand-in inpaint() returned
    for kind in ["original", "masked"]:
        assert np.array_equal(np.asarray(Image.open(out / "inpainted" / kind / "hole168" / "0000_a.png")), crop)


def test_the_masked_caption_never_sees_the_holes_pixels(blip, tmp_path, monkeypatch):
    """Two images that differ only inside the hole: BLIP gets the same picture for the masked caption
    (and, as a check that the holes do differ, not for the original's caption)."""
    no_inpainting(monkeypatch)
    seen = {}
    for noise in (1, 2):
        spy = Spy(monkeypatch)
        harness(tmp_path / f"out{noise}", picture(tmp_path / f"data{noise}", noise), "--prompts", "original,masked",
                "--captioner", blip)
        seen[noise] = spy.seen  # in the order of --prompts: original, then masked
    assert not np.array_equal(seen[1][0], seen[2][0])
    assert np.array_equal(seen[1][1], seen[2][1])
    assert ((tmp_path / "out1/captions/masked_hole168.json").read_text()
            == (tmp_path / "out2/captions/masked_hole168.json").read_text())


def test_prompts_none_writes_what_a_run_without_the_option_writes(tmp_path, monkeypatch):
    """The same files, byte for byte, and the same inpaint() calls (test_table1.py checks those
    outputs against inpaint())."""
    calls = no_inpainting(monkeypatch)
    data = picture(tmp_path / "data")
    harness(tmp_path / "without", data, "--masks", "168,136")
    harness(tmp_path / "none", data, "--masks", "168,136", "--prompts", "none")
    assert calls[:2] == calls[2:] and len(calls) == 4
    names = lambda out: sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names(tmp_path / "without") == names(tmp_path / "none")
    for name in names(tmp_path / "none"):
        if not name.startswith("table1"):  # the tables hold timings
            assert (tmp_path / "none" / name).read_bytes() == (tmp_path / "without" / name).read_bytes(), name
    rows = lambda out: [{k: v for k, v in r.items() if k != "seconds_per_image"}
                        for r in json.loads((out / "table1.json").read_text())["rows"]]
    assert rows(tmp_path / "none") == rows(tmp_path / "without")


def test_the_table_has_a_row_per_hole_and_prompt_with_the_papers_caption_column(blip, tmp_path, monkeypatch, capsys):
    no_inpainting(monkeypatch)
    harness(tmp_path / "out", picture(tmp_path / "data"), "--prompts", "none,original,masked", "--captioner", blip,
            "--masks", "168,136", "--dataset", "bsds500")
    rows = json.loads((tmp_path / "out" / "table1.json").read_text())["rows"]
    assert [(r["hole"], r["prompt"], r["paper_proposed"], r["paper_caption"]) for r in rows] == [
        (168, "none", 56.57, None), (168, "original", 56.57, 51.05), (168, "masked", 56.57, None),
        (136, "none", 39.90, None), (136, "original", 39.90, 37.33), (136, "masked", 39.90, None)]
    text = (tmp_path / "out" / "table1.md").read_text()
    assert "| BSDS500 | 168x168 | original | 1 | 59.54 | 56.57 | 51.05 | - |" in text and text.count("\n") == 8


def test_a_prompt_kind_can_be_added_to_a_run_but_not_another_captioner(blip, tmp_path, monkeypatch, capsys):
    no_inpainting(monkeypatch)
    out, data = tmp_path / "out", picture(tmp_path / "data")
    harness(out, data)
    assert "prompts" not in json.loads((out / "settings.json").read_text())
    harness(out, data, "--prompts", "original", "--captioner", blip)
    assert json.loads((out / "settings.json").read_text())["prompts"] == ["none", "original"]
    assert (out / "inpainted" / "original" / "hole168" / "0000_a.png").is_file()
    other = shutil.copytree(blip, tmp_path / "other-blip")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        table1.run(["--data", str(data), "--out", str(out), *ARGS, "--prompts", "masked", "--captioner", str(other)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "captioner" in err and err.count("\n") == 1, err
    assert json.loads((out / "settings.json").read_text())["prompts"] == ["none", "original"]
