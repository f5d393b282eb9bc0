import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # weights.py and inpaint.py live at the top level


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="where the device-generic tests run: the tiny checkpoint's runs and the CLI's (default cpu)")


def pytest_configure(config):
    import torch

    if config.getoption("device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA GPU is available to PyTorch here")


@pytest.fixture(scope="session")
def device(pytestconfig):
    return pytestconfig.getoption("device")


@pytest.fixture(scope="session")
def close_paths():
    """close(actual, expected): whether two code paths that compute the same float32 function agree,
    as far as float32 rounding lets them. Packed and plain convolutions, a batch of two and two
    batches of one, two memory layouts: each sums in another order, and the tiny random UNet
    amplifies the difference, and guidance (g = 7.5) more. Measured, as a fraction of the output's
    norm, on an Intel Xeon at every oneDNN ISA level from AVX2 to AMX (ONEDNN_MAX_CPU_ISA): up to
    7.4e-4 (a guided batch of two images against each alone), 1.9e-4 (guided, batch 2 against two
    of 1), 1e-4 (two layouts); on an AMD EPYC with AVX-512, 1e-4 (packed against plain). The bound
    is over 10 times the largest; a wrong computation is off by the whole norm. Exact equality is
    asserted only where the same kernels run on the same data."""
    return lambda actual, expected: bool((actual - expected).norm() <= 1e-2 * expected.norm())


@pytest.fixture(scope="session")
def expected():
    """The golden tensors of tests/golden/README.md."""
    return load_file(GOLDEN / "expected.safetensors")


@pytest.fixture(scope="session")
def runs():
    """Settings of the golden runs run_a, run_b, run_c."""
    with safe_open(GOLDEN / "expected.safetensors", framework="pt") as f:
        return json.loads(f.metadata()["runs"])


@pytest.fixture(scope="session")
def tiny_cpu():
    """The tiny golden checkpoint, float32 on the CPU whatever the test device: for tests of loading,
    of the CPU's speed-ups, and of runs that must match a CPU run bit for bit."""
    from weights import load_models

    return load_models(GOLDEN / "tiny-sd", "cpu", "float32")


@pytest.fixture(scope="session")
def tiny(device, tiny_cpu):
    """The same on the test device."""
    from weights import load_models

    return tiny_cpu if device == "cpu" else load_models(GOLDEN / "tiny-sd", device, "float32")


@pytest.fixture(scope="session")
def nan_weights(tmp_path_factory):
    """A copy of the tiny checkpoint with a NaN planted in the UNet's output bias: every run of it makes NaN."""
    import shutil

    from safetensors.torch import save_file

    folder = shutil.copytree(GOLDEN / "tiny-sd", tmp_path_factory.mktemp("nan") / "tiny-sd")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(unet)
    state["conv_out.bias"][0] = float("nan")
    save_file(state, unet, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def golden_picture(runs):
    """picture(models, name, callback=None): what `inpaint()` makes of golden run `name` with `models`."""
    from ldm_min import Options, images, inpaint

    def picture(models, name, callback=None):
        r = runs[name]
        options = Options(prompt=r["prompt"], guidance=r["guidance"], steps=r["steps"], eta=r["eta"], seed=r["seed"],
                          dilate=r["dilate"])
        return inpaint(images.open_image(GOLDEN / r["image"]), images.open_image(GOLDEN / r["mask"]), models, options,
                       callback=callback)
    return picture


@pytest.fixture
def cli(capsys, device):
    """inpaint.py run in this process on the tiny checkpoint, 3 steps, on the test device in float32
    unless the arguments say otherwise (the last flag wins); each call returns (exit status, stderr)."""
    import inpaint

    def run(*args, weights=GOLDEN / "tiny-sd"):
        try:
            inpaint.run(["--weights", str(weights), "--steps", "3", "--device", device, "--dtype", "float32",
                         *map(str, args)])
            status = 0
        except SystemExit as e:
            status = e.code
        return status, capsys.readouterr().err
    return run


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "on", "the",
         "grass", "sky", "blue", "man", "in", "suit"]


@pytest.fixture(scope="session")
def blip(tmp_path_factory):
    """A tiny BLIP with random weights and a 19-word vocabulary, saved as a captioner folder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    import torch
    from transformers.models.blip import BlipImageProcessorPil

    folder = tmp_path_factory.mktemp("blip")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = BlipConfig(text_config=dict(small, vocab_size=len(WORDS), encoder_hidden_size=32, bos_token_id=5,
                                         pad_token_id=0, sep_token_id=3, eos_token_id=3, max_position_embeddings=64),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def blip_words(blip):
    """Every word the tiny BLIP can write."""
    return set((blip / "vocab.txt").read_text().split())


# A reduced ADM in the layout of guided-diffusion's 256x256_diffusion_uncond.pt (ldm_min/adm.py):
# four levels of 32, 32, 64 and 64 channels, 1 ResBlock a level, attention (one head) on the lowest
# only, which is 32 px on DDNM's 256 px windows as in the full model (attention at 128 px would make
# a call on such a window last about 50 s on one core; this layout's takes about 0.6 s), 6 outputs.
TINY_ADM = {"in_channels": 3, "out_channels": 6, "model_channels": 32, "widths": [32, 32, 64, 64], "num_res_blocks": 1,
            "attention_levels": [3]}


@pytest.fixture(scope="session")
def randomize():
    """randomize(module, seed): every tensor of `module` drawn at random in place, those the original
    code starts at zero too (each block's last convolution), at scales that keep activations of
    order one: weights N(0, 1 / fan-in), GroupNorm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    import torch

    def fill(module, seed):
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in module.state_dict().items():  # detached views of the module's tensors
            if tensor.dim() > 1:
                tensor.normal_(0, tensor[0].numel() ** -0.5, generator=generator)
            else:  # the ADM's only 1-d weights are GroupNorm scales
                tensor.normal_(float(name.endswith(".weight")), 0.1, generator=generator)
        return module
    return fill


@pytest.fixture(scope="session")
def tiny_adm(tmp_path_factory, randomize):
    """A reduced random ADM (TINY_ADM) saved as the official file is: a torch.save of its state dict."""
    import torch

    from ldm_min.adm import ADM

    path = tmp_path_factory.mktemp("adm") / "tiny_adm.pt"
    torch.save(randomize(ADM(TINY_ADM), 0).state_dict(), path)
    return path
