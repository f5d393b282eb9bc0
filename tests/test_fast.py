"""The speed-ups of ldm_min/fast.py compute what the plain modules compute."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm_min import fast
from ldm_min.layers import Attention, Upsample
from ldm_min.unet import GEGLU
from weights import adm_config, build, load_adm, read_configs

TINY = Path(__file__).parent / "golden" / "tiny-sd"


def packing(dtype):
    """Skips a test where oneDNN's packed convolutions cannot run in `dtype` (fast.can_pack): they are
    tested wherever they can run, not only where loading uses them (fast.packs)."""
    return pytest.mark.skipif(not fast.can_pack(dtype), reason=f"no packed {dtype} convolutions on this machine")


DTYPES = [pytest.param(dtype, marks=packing(dtype)) for dtype in (torch.float32, torch.bfloat16)]


@pytest.fixture
def agree(close_paths):
    """agree(actual, expected): float32 paths by the suite's rule (close_paths); bfloat16 ones within
    2e-2 of the norm, as the bfloat16 UNet below: a path that rounds its weights to 8 bits once more
    is 2.5e-3 off (measured on an upsampler)."""
    def check(actual, expected):
        if expected.dtype == torch.float32:
            return close_paths(actual, expected)
        return bool((actual.float() - expected.float()).norm() <= 2e-2 * expected.float().norm())
    return check


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, stride", [(3, 1), (1, 1), (3, 2)])
def test_packed_convolution_is_the_convolution(dtype, kernel, stride):
    conv = nn.Conv2d(16, 24, kernel, stride, padding=kernel // 2).to(dtype)
    x = torch.randn(2, 16, 12, 10).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x)
        conv.__class__ = fast.PackedConv2d
        assert torch.equal(conv(x), expected)
        assert conv.weight.is_mkldnn  # packed by that first call


@packing(torch.float32)
def test_packed_convolution_takes_other_sizes_than_its_first():
    conv, first, other = nn.Conv2d(8, 8, 3, padding=1), torch.randn(1, 8, 16, 16), torch.randn(3, 8, 5, 7)
    with torch.no_grad():
        expected = conv(other)
        conv.__class__ = fast.PackedConv2d
        conv(first)
        assert torch.allclose(conv(other), expected, atol=1e-6)


@packing(torch.float32)
@pytest.mark.parametrize("module, packed, shape", [
    (lambda: nn.Conv2d(8, 12, 3, padding=1), fast.PackedConv2d, (1, 8, 6, 6)),
    (lambda: Upsample(8), fast.PackedUpsample, (1, 8, 4, 4)),
    (lambda: nn.Linear(8, 12), fast.PackedLinear, (1, 5, 8)),
    (lambda: GEGLU(8, 32), fast.FusedGEGLU, (1, 5, 8)),
], ids=["convolution", "upsampling", "linear", "gated GELU"])
def test_a_packed_module_saves_its_plain_weights(module, packed, shape):
    module = module()
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    module.__class__ = packed
    with torch.no_grad():
        module(torch.randn(shape))  # packs them
    state = module.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_packed_upsampling_is_nearest_upsampling_then_the_convolution(dtype, layout, agree):
    torch.manual_seed(0)
    up = Upsample(16).to(dtype)
    x = torch.randn(2, 16, 6, 5).to(dtype).contiguous(memory_format=layout)
    with torch.no_grad():
        expected = up(x)
        up.__class__ = fast.PackedUpsample
        out = up(x)
        assert up.transposed.is_mkldnn  # the fused path ran
        assert out.shape == expected.shape and agree(out, expected)
        assert torch.equal(up(x, size=(12, 10)), out)  # twice the input's size, asked: the same path


@packing(torch.float32)
@pytest.mark.parametrize("module, packed, first, other", [
    (lambda: nn.Conv2d(8, 12, 1), fast.PackedConv2d, (1, 8, 16, 16), (1, 8, 2, 2)),
    (lambda: Upsample(8), fast.PackedUpsample, (1, 8, 8, 8), (2, 8, 3, 4)),
    (lambda: nn.Linear(8, 12), fast.PackedLinear, (1, 256, 8), (1, 16, 8)),
    (lambda: GEGLU(8, 32), fast.FusedGEGLU, (1, 256, 8), (2, 16, 8)),
], ids=["convolution", "upsampling", "linear", "gated GELU"])
def test_a_packed_module_is_laid_out_again_for_another_input_shape(module, packed, first, other):
    # A layout made for one shape can be oneDNN's slow path for another (fast.LaidOut): once, not per call.
    torch.manual_seed(0)
    module, x, y = module(), torch.randn(first), torch.randn(other)
    weights = lambda: [getattr(module, name) for name in getattr(module, "laid_out", ["transposed"])]
    with torch.no_grad():
        expected = module(y)
        module.__class__ = packed
        module(x)
        out, laid_out = module(y), weights()
        assert torch.equal(module(y), out) and all(a is b for a, b in zip(weights(), laid_out))  # not again
    assert module.laid_out_for == (other if packed in (fast.PackedConv2d, fast.PackedUpsample) else fast.rows(y))
    assert torch.allclose(out, expected, atol=1e-5)


@packing(torch.float32)
def test_packed_upsampling_takes_its_fused_path_after_its_plain_one():
    up, odd, even = Upsample(8), torch.randn(1, 8, 3, 3), torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        expected = up(even)
        fast.pack(up, convolutions=True)
        up.__class__ = fast.PackedUpsample
        up(odd, size=(5, 5))  # the plain path lays out its convolution's weights
        assert torch.allclose(up(even), expected, atol=1e-5)
    assert up.transposed.is_mkldnn


@packing(torch.float32)
def test_packed_upsampling_to_another_size_is_the_plain_path():
    up, x = Upsample(8), torch.randn(1, 8, 3, 3)  # an odd skip connection: 3 -> 5, not 6
    with torch.no_grad():
        expected = up(x, size=(5, 5))
        up.__class__ = fast.PackedUpsample
        assert torch.equal(up(x, size=(5, 5)), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, bias", [((2, 7, 24), True), ((7, 24), True), ((1, 300, 24), False)])
def test_packed_linear_is_the_linear(dtype, shape, bias, agree):
    linear, x = nn.Linear(24, 40, bias=bias).to(dtype), torch.randn(shape).to(dtype)
    with torch.no_grad():
        expected = linear(x)
        linear.__class__ = fast.PackedLinear
        out = linear(x)
    assert linear.weight.is_mkldnn  # laid out by that first call
    assert out.shape == expected.shape and agree(out, expected)


@packing(torch.float32)
def test_packed_linear_takes_other_rows_than_its_first():
    linear, first, other = nn.Linear(24, 40), torch.randn(1, 77, 24), torch.randn(2, 77, 24)  # guidance's batch
    with torch.no_grad():
        expected = linear(other)
        linear.__class__ = fast.PackedLinear
        linear(first)
        assert torch.allclose(linear(other), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_gated_gelu_is_the_gated_gelu(dtype, agree):
    torch.manual_seed(0)
    geglu, first, other = GEGLU(32, 128).to(dtype), torch.randn(1, 50, 32).to(dtype), torch.randn(2, 9, 32).to(dtype)
    with torch.no_grad():
        expected = geglu(first), geglu(other)
        geglu.__class__ = fast.FusedGEGLU
        out = geglu(first), geglu(other)  # laid out for the first's rows, right for any
    assert geglu.gate.is_mkldnn and not hasattr(geglu, "proj")  # the fused path ran, the plain weights gone
    assert all(agree(a, b) for a, b in zip(out, expected))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 50 queries a thread at 301 tokens (the last block short), so that a small attention takes
    the path of the large ones; every head at once below 301 * 50 scores a head."""
    monkeypatch.setattr(fast, "SCORES", 301 * 50)


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_self_attention_is_the_attention(dtype, agree, small_blocks):
    torch.manual_seed(0)
    attention, x = Attention(64, heads=2).to(dtype), torch.randn(2, 301, 64).to(dtype)
    with torch.no_grad():
        expected = attention(x)
        attention.__class__ = fast.BlockedAttention
        assert agree(attention(x), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("context_dim, tokens", [(None, 40), (32, 150)])  # self-attention, cross-attention
def test_attention_of_small_heads_is_the_attention(dtype, context_dim, tokens, agree, small_blocks):
    torch.manual_seed(0)
    attention, x = Attention(64, heads=2, context_dim=context_dim).to(dtype), torch.randn(2, tokens, 64).to(dtype)
    context = torch.randn(2, 77, context_dim).to(dtype) if context_dim else None
    with torch.no_grad():
        expected = attention(x, context)
        attention.__class__ = fast.BlockedAttention
        assert agree(attention(x, context), expected)


@packing(torch.float32)
def test_heads_of_fewer_scores_than_a_block_go_all_at_once(monkeypatch, small_blocks):
    at_once = []
    monkeypatch.setattr(fast, "softmax", lambda scores: at_once.append(scores.shape) or scores.softmax(-1))
    cross, self_ = Attention(64, heads=2, context_dim=32), Attention(64, heads=2)
    cross.__class__ = self_.__class__ = fast.BlockedAttention
    with torch.no_grad():
        cross(torch.randn(1, 150, 64), torch.randn(1, 77, 32))
        self_(torch.randn(1, 40, 64))
        self_(torch.randn(1, 301, 64))  # 301 * 301 scores a head: in blocks
    assert at_once == [(1, 2, 150, 77), (1, 2, 40, 40)]


def test_attention_is_blocked_in_bfloat16_without_amx_only(monkeypatch):
    monkeypatch.setattr(fast, "can_pack", lambda dtype: True)
    for amx in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert fast.blocks_attention(torch.bfloat16) == (not amx)
        assert not fast.blocks_attention(torch.float32)


@pytest.fixture(scope="module")
def plain(tiny_cpu):
    """The tiny checkpoint's UNet and VAE as built, with the loaded weights, and no speed-up."""
    with torch.device("meta"):
        modules = build(read_configs(TINY))
    for part in ("unet", "vae"):
        modules[part].to_empty(device="cpu").load_state_dict(getattr(tiny_cpu, part).state_dict())
    return modules


def sped_up(module):
    """A copy of `module` with every speed-up and channels-last inside."""
    module = copy.deepcopy(module)
    fast.pack(module, convolutions=True, attention=True)
    fast.fuse_upsampling(module)
    fast.channels_last_inside(module)
    return module


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_each_part_is_packed_where_packing_pays_and_nowhere_else(tiny_cpu, part):
    module, packed = getattr(tiny_cpu, part), fast.can_pack(torch.float32)
    kinds = lambda cls: {type(m) for m in module.modules() if isinstance(m, cls)}
    assert kinds(nn.Conv2d) == ({fast.PackedConv2d} if fast.packs(part, torch.float32) else {nn.Conv2d})
    assert kinds(nn.Linear) == ({fast.PackedLinear} if packed else {nn.Linear})
    upsamplers = [type(m) for m in module.modules() if isinstance(m, Upsample)]
    deepest_plain = part == "unet"  # the UNet's deepest kernel would cost more memory than it saves time
    assert upsamplers == [Upsample if not packed or (i == 0 and deepest_plain) else fast.PackedUpsample
                          for i in range(len(upsamplers))]


def test_the_unet_is_packed_on_every_cpu_that_packs_and_the_vae_only_with_amx(monkeypatch):
    monkeypatch.setattr(fast, "can_pack", lambda dtype: True)
    for amx in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert fast.packs("unet", torch.float32) and fast.packs("unet", torch.bfloat16)
        assert fast.packs("vae", torch.float32) == amx == fast.packs("vae", torch.bfloat16)
    monkeypatch.setattr(fast, "can_pack", lambda dtype: False)
    assert not fast.packs("unet", torch.float32) and not fast.packs("vae", torch.float32)


@packing(torch.float32)
@pytest.mark.parametrize("h, w", [(8, 8), (16, 16), (5, 7)])
def test_sped_up_unet_computes_what_the_plain_unet_computes(plain, close_paths, h, w):
    # Against the plain UNet on the same (channels-last) layout. Still two code paths: the bound is
    # the suite's rule for them (the close_paths fixture).
    torch.manual_seed(0)
    z, context = torch.randn(2, 4, h, w), torch.randn(2, 77, 32)
    unet = sped_up(plain["unet"])
    with torch.no_grad():
        fast_eps = unet(z, 500, context)
        expected = plain["unet"](z.contiguous(memory_format=torch.channels_last), 500, context)
    assert unet.conv_in.weight.is_mkldnn  # the packed path ran
    assert close_paths(fast_eps, expected)


@packing(torch.float32)
def test_a_sped_up_unet_takes_one_size_after_another(plain, close_paths):
    # As the page and a folder of pictures call it: odd latent sides (the upsamplers' plain path) and even ones.
    torch.manual_seed(0)
    unet, context = sped_up(plain["unet"]), torch.randn(1, 77, 32)
    for h, w in [(5, 7), (16, 16), (8, 8), (16, 16)]:
        z = torch.randn(1, 4, h, w)
        with torch.no_grad():
            expected = plain["unet"](z.contiguous(memory_format=torch.channels_last), 500, context)
            assert close_paths(unet(z, 500, context), expected)


def test_sped_up_vae_computes_what_the_plain_vae_computes(tiny_cpu, plain, close_paths):
    x, z = torch.rand(1, 3, 64, 48) * 2 - 1, torch.randn(1, 4, 8, 6)
    with torch.no_grad():
        assert close_paths(tiny_cpu.vae.encode(x), plain["vae"].encode(x))
        assert close_paths(tiny_cpu.vae.decode(z), plain["vae"].decode(z))


def plain_adm(path):
    """The ADM of the file at `path` as built, with none of the speed-ups that load_adm applies."""
    from ldm_min.adm import ADM

    state = torch.load(path, weights_only=True)
    model = ADM(adm_config({name: list(t.shape) for name, t in state.items()}, path))
    model.load_state_dict(state)
    return model.requires_grad_(False).eval()


def test_the_adm_is_packed_where_the_sd_unet_is(tiny_adm):
    adm, packed = load_adm(tiny_adm, "cpu", "float32"), fast.can_pack(torch.float32)
    kinds = lambda cls: {type(m) for m in adm.modules() if isinstance(m, cls)}
    assert fast.packs("adm", torch.float32) == fast.packs("unet", torch.float32)
    assert kinds(nn.Conv2d) == ({fast.PackedConv2d} if fast.packs("adm", torch.float32) else {nn.Conv2d})
    assert kinds(nn.Linear) == ({fast.PackedLinear} if packed else {nn.Linear})
    assert kinds(nn.Conv1d) == ({fast.PackedConv1d} if fast.packs("adm", torch.float32) else {nn.Conv1d})


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_packed_1_wide_conv1d_is_the_conv1d_with_channels_of_unit_stride(dtype, agree):
    conv, x = nn.Conv1d(64, 192, 1).to(dtype), torch.randn(2, 64, 50).to(dtype)
    with torch.no_grad():
        expected = conv(x)
        conv.__class__ = fast.PackedConv1d
        out = conv(x)
    assert out.shape == expected.shape and out.stride(1) == 1 and agree(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_adm_as_loaded_computes_what_the_plain_adm_computes(tiny_adm, dtype, agree):
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32).clamp(-1, 1).to(dtype), torch.tensor([3, 977])
    adm, plain = load_adm(tiny_adm, "cpu", str(dtype).removeprefix("torch.")), plain_adm(tiny_adm).to(dtype)
    with torch.no_grad():
        eps = adm(x, t)
        expected = plain(x.contiguous(memory_format=torch.channels_last), t)
    assert adm.input_blocks[0][0].weight.is_mkldnn  # the packed path ran
    assert eps.is_contiguous() and agree(eps, expected)


def test_channels_last_inside_a_module_and_the_default_layout_out():
    conv, x = nn.Conv2d(8, 8, 3, padding=1), torch.randn(1, 8, 16, 16)
    expected, seen = conv(x), []
    fast.channels_last_inside(conv)
    conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    out = conv(x)
    assert seen == [True] and out.is_contiguous() and torch.allclose(out, expected, atol=1e-6)


def test_channels_last_inside_hands_the_module_the_usual_strides():
    conv, seen = nn.Conv2d(3, 8, 3, padding=1), []
    fast.channels_last_inside(conv)
    conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].stride()))
    picture = torch.rand(16, 16, 3).permute(2, 0, 1)[None]  # read from pixels: channels-last, a batch stride of 3
    with torch.no_grad():
        conv(picture), conv(picture.contiguous())
    assert seen == [(768, 1, 48, 3)] * 2


@packing(torch.bfloat16)
def test_bfloat16_unet_computes_what_the_plain_unet_computes(plain):
    unet, expected_unet = sped_up(plain["unet"]).bfloat16(), copy.deepcopy(plain["unet"]).bfloat16()
    z, context = torch.randn(1, 4, 16, 16).bfloat16(), torch.randn(1, 77, 32).bfloat16()
    with torch.no_grad():
        eps, expected = unet(z, 500, context), expected_unet(z, 500, context)
    assert unet.conv_in.weight.is_mkldnn
    assert eps.is_contiguous()  # handed back in the default layout
    assert (eps.float() - expected.float()).norm() <= 2e-2 * expected.float().norm()
