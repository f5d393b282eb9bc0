"""--prompt auto: a BLIP caption of the masked image, on a tiny random-weight BLIP saved here."""
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import inpaint
import weights
from ldm_min import WeightsError, images
from ldm_min.caption import caption, fill_from_known

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
IMAGE, MASK = GOLDEN / "astronaut128.png", GOLDEN / "astronaut128_mask.png"


def test_the_captioner_never_sees_the_holes_pixels():
    x, hole = images.prepare(Image.open(IMAGE), Image.open(MASK))
    other = torch.where(hole > 0, torch.rand_like(x) * 2 - 1, x)  # only the hole's pixels differ
    assert not torch.equal(other, x)
    assert torch.equal(fill_from_known(other, hole), fill_from_known(x, hole))


def test_the_hole_is_filled_from_the_known_pixels_not_grey():
    x = torch.tensor([0.8, -0.2, 0.4])[None, :, None, None].expand(1, 3, 40, 40)  # one colour everywhere
    hole = torch.zeros(1, 1, 40, 40)
    hole[..., 5:30, 10:38] = 1
    assert torch.allclose(fill_from_known(x, hole), x, atol=1e-6)


def test_prompt_auto_captions_then_guides_every_unet_pass_with_the_caption(blip, blip_words, capsys, monkeypatch,
                                                                           tmp_path, device):
    contexts, load_models = [], weights.load_models

    def recording(*args, **kwargs):
        models = load_models(*args, **kwargs)
        unet = models.unet
        models.unet = lambda z, t, context: contexts.append(context) or unet(z, t, context)
        recording.models = models
        return models

    monkeypatch.setattr(weights, "load_models", recording)
    monkeypatch.chdir(tmp_path)
    inpaint.run([str(IMAGE), str(MASK), "--weights", str(GOLDEN / "tiny-sd"), "--steps", "2", "--prompt", "auto",
                 "--captioner", str(blip), "--device", device, "--dtype", "float32"])
    err = capsys.readouterr().err
    text = re.search(r"^caption: (.*)$", err, re.M).group(1)
    assert text and set(text.split()) <= blip_words
    encode = recording.models.encode_text
    assert len(contexts) == 2
    assert all(torch.equal(c, torch.cat([encode(""), encode(text)])) for c in contexts)  # guided, batch 2
    assert (tmp_path / "astronaut128_inpainted.png").is_file()


def test_the_api_caption_is_the_one_the_cli_uses(blip, blip_words, device):
    captioner = weights.load_captioner(blip, device, "float32")
    first, again = (caption(Image.open(IMAGE), Image.open(MASK), captioner) for _ in range(2))
    assert first == again and set(first.split()) <= blip_words


def test_a_missing_captioner_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        inpaint.run([str(IMAGE), str(MASK), "--weights", str(GOLDEN / "tiny-sd"), "--prompt", "auto",
                     "--captioner", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--captioner" in err and "no such folder" in err
    assert os.listdir(tmp_path) == []


def test_a_pickle_only_captioner_is_refused(blip, tmp_path):
    folder = shutil.copytree(blip, tmp_path / "blip")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="safetensors files only"):
        weights.load_captioner(folder, "cpu", "float32")


def test_the_hub_download_asks_only_for_the_files_it_reads():
    repo = ["README.md", "config.json", "preprocessor_config.json", "pytorch_model.bin", "model.safetensors",
            "tf_model.h5", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    wanted = {f for f in repo if any(fnmatch.fnmatch(f, p) for p in weights.CAPTIONER_FILES)}
    assert wanted == set(repo) - {"README.md", "pytorch_model.bin", "tf_model.h5"}


def test_the_default_captioner_offline_without_cache_says_how_to_get_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", "import weights; weights.load_captioner(None, 'cpu', 'float32')"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "could not get the captioner Salesforce/blip-image-captioning-large" in r.stderr
    assert "--captioner FOLDER" in r.stderr
