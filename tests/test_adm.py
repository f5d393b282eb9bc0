"""ldm_min/adm.py loaded by weights.load_adm, against guided-diffusion's own UNetModel on random
weights, and each file load_adm refuses. The oracle is the PyPI package guided-diffusion-sdk 1.0.0
(test-only, installed by .ci/run): its unet.py and nn.py compute what openai/guided-diffusion's do
(they differ only in gradient checkpointing). Outside CI, without it, the parity tests skip."""
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_min import WeightsError
from ldm_min.adm import ADM
from weights import adm_config, load_adm

HERE = Path(__file__).parent
# Every tensor name and shape of 256x256_diffusion_uncond.pt (openai/guided-diffusion).
UNCOND_KEYS = HERE / "adm256_uncond_keys.tsv"
# Its flags in guided-diffusion's README, but --use_fp16 (float32 here, for parity to the rounding).
UNCOND_FLAGS = dict(image_size=256, num_channels=256, num_res_blocks=2, learn_sigma=True, class_cond=False,
                    attention_resolutions="32,16,8", num_head_channels=64, resblock_updown=True,
                    use_scale_shift_norm=True)
# A reduced layout: 3 levels (32, 64, 128 channels), attention at 1/2 and 1/4 of the size (1 and 2 heads).
REDUCED_FLAGS = dict(UNCOND_FLAGS, image_size=64, num_channels=32, channel_mult="1,2,4", attention_resolutions="32,16")


def guided_diffusion_model(flags):
    """guided-diffusion's UNetModel built by its own create_model from `flags`, weights not yet set
    (on `meta`: the full model's random initialisation alone takes seconds)."""
    try:
        from guided_diffusion.script_util import create_model
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI must run the ADM parity tests: pip install --no-deps -r requirements-test.txt")
        pytest.skip("guided-diffusion-sdk, the parity oracle, is not installed: pip install --no-deps -r "
                    "requirements-test.txt")
    with torch.device("meta"):
        return create_model(**flags).to_empty(device="cpu").eval()


def uncond_shapes():
    lines = UNCOND_KEYS.read_text().splitlines()[1:]  # after the header line
    rows = (line.split("\t") for line in lines)
    return {name: [int(d) for d in shape.strip("[]").split(",")] for name, shape in rows}


def outputs(model, size, dtype=torch.float32):
    """The model's output on a fixed batch of two: noisy images in [-1, 1] at an early and a late timestep."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        return model(x.to(dtype), torch.tensor([3, 977])).float()


def assert_parity(ours, theirs):
    """Equal as far as float32 rounding lets two codes that sum in different orders be (attention:
    one product scaled by 1/sqrt(d), against q and k scaled by d^(-1/4) each). Measured, as a
    fraction of the largest output: 0 on the reduced layout, 6e-7 (1.8e-6 with oneDNN held to AVX2)
    on the full one. The bound is over 50 times that; a wrong computation is off by the whole."""
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_reduced_layout_matches_guided_diffusion(tmp_path, randomize):
    theirs = randomize(guided_diffusion_model(REDUCED_FLAGS), 0)
    torch.save(theirs.state_dict(), tmp_path / "reduced.pt")
    ours = load_adm(tmp_path / "reduced.pt", "cpu", "float32")
    assert_parity(outputs(ours, 32), outputs(theirs, 32))


def test_full_uncond_layout_matches_guided_diffusion(tmp_path, randomize):
    """The full 552M-parameter model, at 32 px (1 px at its lowest level): 2.2 GB of weights drawn,
    written and read, 20 to 40 s on one core."""
    theirs = randomize(guided_diffusion_model(UNCOND_FLAGS), 0)
    expected = outputs(theirs, 32)
    torch.save(theirs.state_dict(), tmp_path / "uncond.pt")
    del theirs  # one copy of the weights in memory at a time
    ours = load_adm(tmp_path / "uncond.pt", "cpu", "float32")
    (tmp_path / "uncond.pt").unlink()  # pytest keeps the temporary folders of its last runs
    assert_parity(outputs(ours, 32), expected)


def test_layout_read_from_the_official_tensors():
    shapes = uncond_shapes()
    cfg = adm_config(shapes, UNCOND_KEYS)
    assert cfg == {"in_channels": 3, "out_channels": 6, "model_channels": 256, "num_res_blocks": 2,
                   "widths": [256, 256, 512, 512, 1024, 1024], "attention_levels": [3, 4, 5]}
    with torch.device("meta"):
        state = ADM(cfg).state_dict()
    assert {name: list(tensor.shape) for name, tensor in state.items()} == shapes
    assert (len(state), sum(tensor.numel() for tensor in state.values())) == (566, 552_814_086)


LAYOUTS = [  # reduced layouts unlike the full one: one level, three ResBlocks a level, attention anywhere or nowhere
    {"widths": [64], "num_res_blocks": 2, "attention_levels": [0]},
    {"widths": [32, 64, 64], "num_res_blocks": 3, "attention_levels": []},
    {"widths": [64, 32, 128, 32, 64], "num_res_blocks": 1, "attention_levels": [0, 2, 4]},
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_read_from_tensors_is_the_one_written(layout):
    cfg = {"in_channels": 3, "out_channels": 6, "model_channels": 32, **layout}
    with torch.device("meta"):
        shapes = {name: list(tensor.shape) for name, tensor in ADM(cfg).state_dict().items()}
    assert adm_config(shapes, "model.pt") == cfg


def test_safetensors_copy_loads_the_same(tiny_adm, tmp_path):
    save_file(torch.load(tiny_adm, weights_only=True), tmp_path / "tiny_adm.safetensors")
    from_safetensors = load_adm(tmp_path / "tiny_adm.safetensors", "cpu", "float32")
    assert torch.equal(outputs(from_safetensors, 16), outputs(load_adm(tiny_adm, "cpu", "float32"), 16))


def test_bfloat16_stays_near_float32(tiny_adm):
    """Half precision, as on a GPU: the norms compute in float32, the rest rounds to 8 bits of mantissa."""
    reference = outputs(load_adm(tiny_adm, "cpu", "float32"), 16)
    half = outputs(load_adm(tiny_adm, "cpu", "bfloat16"), 16, torch.bfloat16)
    assert (half - reference).norm() <= 0.1 * reference.norm()


class WritesAFile:
    """What a malicious pickle can do: unpickling this object calls Path.write_text."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.write_text, (self.path, "this ran")


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tiny_adm, tmp_path):
    state = torch.load(tiny_adm, weights_only=True)
    state["payload"] = WritesAFile(tmp_path / "ran.txt")
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="refused") as refused:
        load_adm(tmp_path / "evil.pt", "cpu", "float32")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "ran.txt").exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # a full unpickle: the file does run code
    assert (tmp_path / "ran.txt").read_text() == "this ran"


def without(name):
    return lambda state: {k: v for k, v in state.items() if k != name}


def plus(name, tensor):
    return lambda state: {**state, name: tensor}


WRONG_FILES = {  # each change to the tiny checkpoint, and what the one-line refusal names
    "missing tensor": (without("input_blocks.7.1.qkv.bias"), "tensor input_blocks.7.1.qkv.bias is missing"),
    "extra tensor": (plus("output_blocks.0.2.weight", torch.zeros(3)), "unexpected tensor output_blocks.0.2.weight"),
    "misshapen tensor": (plus("middle_block.1.qkv.weight", torch.zeros(192, 64, 3)),
                         "tensor middle_block.1.qkv.weight has shape [192, 64, 3], expected [192, 64, 1]"),
    "class-conditional": (plus("label_emb.weight", torch.zeros(1000, 128)), "a class-conditional ADM"),
    "no ADM": (lambda state: {"conv_in.weight": torch.zeros(32, 4, 3, 3)}, "no tensor input_blocks.0.0.weight"),
    "widths GroupNorm cannot split": (
        lambda state: {k: v[:48] if k.startswith("input_blocks.5.0.out_layers.3") else v for k, v in state.items()},
        "level widths [32, 32, 48, 64]"),
    "not a state dict": (lambda state: list(state.values()), "not a state dict"),
}


@pytest.mark.parametrize("change", WRONG_FILES, ids=list(WRONG_FILES))
def test_wrong_file_is_refused_in_one_line(tiny_adm, tmp_path, change):
    edit, message = WRONG_FILES[change]
    torch.save(edit(torch.load(tiny_adm, weights_only=True)), tmp_path / "wrong.pt")
    with pytest.raises(WeightsError, match=re.escape(message)) as refused:
        load_adm(tmp_path / "wrong.pt", "cpu", "float32")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_damaged_file_is_refused_in_one_line(tmp_path, content):
    for suffix in (".pt", ".safetensors"):
        (tmp_path / f"damaged{suffix}").write_bytes(content)
        with pytest.raises(WeightsError) as refused:
            load_adm(tmp_path / f"damaged{suffix}", "cpu", "float32")
        assert "\n" not in str(refused.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_adm(tmp_path / "256x256_diffusion_uncond.pt")
