"""The speed-ups of ldm_min/fast.py compute what the plain modules compute."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_min import fast
from weights import build, load_models, read_configs

TINY = Path(__file__).parent / "golden" / "tiny-sd"


@pytest.mark.parametrize("kernel, size", [(3, 8), (3, 16), (1, 8), (3, 32)])
def test_matmul_convolution_is_the_convolution(kernel, size):
    conv = nn.Conv2d(16, 24, kernel, padding=kernel // 2)
    x = torch.randn(2, 16, size, size)
    expected = conv(x)
    conv.__class__ = fast.MatmulConv2d
    assert torch.allclose(conv(x), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def plain(tiny_cpu):
    """The tiny checkpoint's UNet and VAE as built, with the loaded weights, and no speed-up."""
    with torch.device("meta"):
        modules = build(read_configs(TINY))
    for part in ("unet", "vae"):
        modules[part].to_empty(device="cpu").load_state_dict(getattr(tiny_cpu, part).state_dict())
    return modules


def test_the_sped_up_models_have_matmul_convolutions(tiny_cpu):
    assert any(isinstance(m, fast.MatmulConv2d) for m in tiny_cpu.unet.modules())
    assert any(isinstance(m, fast.MatmulConv2d) for m in tiny_cpu.vae.modules())


@pytest.mark.parametrize("h, w", [(8, 8), (16, 16), (5, 7)])
def test_sped_up_unet_computes_what_the_plain_unet_computes(tiny_cpu, plain, monkeypatch, h, w):
    z, context = torch.randn(2, 4, h, w), torch.randn(2, 77, 32)
    unfolds, unfold = [], F.unfold
    monkeypatch.setattr(F, "unfold", lambda *a, **k: unfolds.append(1) or unfold(*a, **k))
    with torch.no_grad():
        fast_eps = tiny_cpu.unet(z, 500, context)
        assert unfolds  # the matrix-product path ran
        assert torch.allclose(fast_eps, plain["unet"](z, 500, context), rtol=1e-4, atol=1e-5)


def test_sped_up_vae_computes_what_the_plain_vae_computes(tiny_cpu, plain):
    x, z = torch.rand(1, 3, 64, 48) * 2 - 1, torch.randn(1, 4, 8, 6)
    with torch.no_grad():
        assert torch.allclose(tiny_cpu.vae.encode(x), plain["vae"].encode(x), rtol=1e-4, atol=1e-5)
        assert torch.allclose(tiny_cpu.vae.decode(z), plain["vae"].decode(z), rtol=1e-4, atol=1e-5)


def test_channels_last_inside_a_module_and_the_default_layout_out():
    conv, x = nn.Conv2d(8, 8, 3, padding=1), torch.randn(1, 8, 16, 16)
    expected, seen = conv(x), []
    fast.channels_last_inside(conv)
    conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    out = conv(x)
    assert seen == [True] and out.is_contiguous() and torch.allclose(out, expected, atol=1e-6)


def test_bfloat16_unet_runs_channels_last_and_computes_what_the_plain_unet_computes(plain):
    models = load_models(TINY, "cpu", "bfloat16")
    assert models.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    z, context = torch.randn(1, 4, 16, 16).bfloat16(), torch.randn(1, 77, 32).bfloat16()
    with torch.no_grad():
        eps, expected = models.unet(z, 500, context), copy.deepcopy(plain["unet"]).bfloat16()(z, 500, context)
    assert eps.is_contiguous()  # handed back in the default layout
    assert (eps.float() - expected.float()).norm() <= 2e-2 * expected.float().norm()
