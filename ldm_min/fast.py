"""What makes the models fast, in one place, applied after loading: the model files show the
architecture only. Each speed-up computes what the plain modules compute (tests/test_fast.py)."""
import ctypes
import platform
import sys

import torch
from torch import nn

from .layers import Attention, Upsample
from .unet import GEGLU

# glibc keeps freed heap memory for reuse, and only malloc_trim hands it back to the system.
malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None


def hand_back_freed_memory():
    """After plain weights (or copies made on the way) are freed for laid-out ones, layer by layer: glibc
    would keep most of that memory, and the VAE decoder's large maps do not reuse it (bfloat16 peaked
    0.3 GiB higher). Handed back every 64 MiB instead, or once after a model's call, the bfloat16 UNet's
    first call at 32x32 latents took 1.3 s rather than 2.1 (machine I), but the bfloat16 peak rose 0.08
    and 0.17 GiB (`benchmarks/bench.py --steps 2`)."""
    if malloc_trim:
        malloc_trim(0)


def plain(weight):
    """A weight as the plain tensor it holds, whether or not oneDNN has laid it out."""
    return weight.to_dense() if weight.is_mkldnn else weight.detach()


class LaidOut:
    """A module whose weights (the attributes named in `laid_out`) oneDNN lays out for its kernels at the
    first call, and again at the first call on an input of another shape: oneDNN picks its kernel, and
    the layout that kernel reads, for the shape. A layout made for another shape can cost more than the
    product: a UNet laid out at 64x64 latents, then called at 16x16, took 1.32 s a bfloat16 step, and
    0.21 s laid out again for it, its 1x1 convolutions at 2x2 and 4x4 taking 48 ms each (machine I). A
    picture of another size, in the page or a folder of pictures, lays the weights out once more (2-3 s
    for the v1.4 UNet), not at every call."""

    laid_out = ("weight",)
    laid_out_for = None  # the input shape (or a linear's rows) the weights are laid out for

    def lay_out(self, shape, reorder):
        """The weights laid out by `reorder` (from their plain form) for inputs of `shape`, unless they are."""
        if shape == self.laid_out_for:
            return
        for name in self.laid_out:
            weight = reorder(plain(getattr(self, name)))
            setattr(self, name, nn.Parameter(weight, requires_grad=False) if name in self._parameters else weight)
        self.laid_out_for = shape
        hand_back_freed_memory()  # the weights' last form


class PackedWeight(LaidOut):
    """A module whose `weight` is laid out for oneDNN (`LaidOut`) while its state dict still holds the
    plain weights."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self.weight.to_dense()


class PackedConv2d(PackedWeight, nn.Conv2d):
    """A CPU convolution whose weights oneDNN lays out for its kernels once for each input shape
    (`LaidOut`), and not again at every call as `F.conv2d` does. On channels-last feature maps it
    computes exactly what `nn.Conv2d` computes. It pays most where the weights outweigh the feature
    maps: a 1280-wide 3x3 convolution at 8x8 took 5.8 -> 1.4 ms in bfloat16, and 26 -> 6.5 ms in float32."""

    def forward(self, x):
        # Laid out for this input's shape, which picks the kernel: packed without it, a float32 512x512
        # UNet step took 3.9 s, against 3.1 (and 4.3 unpacked).
        self.lay_out(x.shape, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
            w, self.padding, self.stride, self.dilation, self.groups, x.shape))
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], "")


# In one dimension, nearest 2x upsampling then a 3-tap convolution (padding 1) makes output 2i from
# x[i-1] w0 + x[i] (w1 + w2), and output 2i+1 from x[i] (w0 + w1) + x[i+1] w2: a transposed convolution
# of stride 2 and padding 1 whose 4 taps are TAPS @ w.
TAPS = torch.tensor([[0.0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
TRANSPOSED = dict(padding=[1, 1], output_padding=[0, 0], stride=[2, 2], dilation=[1, 1], groups=1)


class PackedUpsample(Upsample):
    """Nearest 2x upsampling and the 3x3 convolution after it, as one stride-2 transposed convolution
    with a 4x4 kernel (TAPS w TAPS^T for each pair of channels): each output pixel takes 2x2 input
    pixels instead of 3x3 upsampled ones, 4/9 of the multiplications, and the upsampled map is never
    made. The kernel is derived and laid out for oneDNN at the first call, and again for another
    input shape, as `PackedConv2d`'s weights are; the state dict keeps the plain convolution. A size
    other than twice the input (the UNet's skip connection of an odd side) takes the plain path. On
    one core of the AMD EPYC (machine F), float32, the VAE decoder's 256-wide step to 512x512 took
    2.04 -> 0.74 s."""

    laid_out_for = None  # the input shape `transposed` is laid out for

    def forward(self, x, size=None):
        if size is not None and tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return super().forward(x, size)
        if x.shape != self.laid_out_for:
            w = plain(self.conv.weight).float()  # laid out by the plain path, at an odd size, or not
            taps = TAPS.to(w.device)
            kernel = torch.einsum("ka,oiab,lb->iokl", taps, w, taps).to(self.conv.weight.dtype)
            self.transposed = torch.ops.mkldnn._reorder_convolution_transpose_weight(
                kernel, *TRANSPOSED.values(), x.shape)
            self.laid_out_for = x.shape
            del w, kernel
            hand_back_freed_memory()
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x, self.transposed, self.conv.bias, *TRANSPOSED.values(), "none", [], "")


def rows(x):
    """The rows of the matrix product a linear layer makes of `x`: oneDNN lays its weights out for them."""
    return x.numel() // x.shape[-1]


class PackedLinear(PackedWeight, nn.Linear):
    """A linear layer computed by oneDNN, the library of the CPU convolutions, rather than by the
    BLAS that `F.linear` calls in float32 (MKL), which runs its AVX2 kernels on AMD CPUs, with its
    weights laid out for the call's rows once (`LaidOut`), not at every call. The same result (equal
    bits in every shape tried). On one core of the AMD EPYC (machine F), float32, the UNet's 4096x320
    -> 320 product took 80 -> 234 GFLOP/s, and under AVX2 kernels 98 -> 114. Laid out once, on both cores
    of a Zen 4 EPYC (machine I), bfloat16: 380 -> 442 GFLOP/s there, 4096x320 -> 2560 368 -> 422."""

    def forward(self, x):
        self.lay_out(rows(x), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows(x)))
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class FusedGEGLU(LaidOut, GEGLU):
    """The feed-forward's gated GELU as two oneDNN linears, each half of `proj` with its weights laid
    out (`LaidOut`): the gate's with GELU applied to its result inside the product, the value's with its
    result multiplied by the gate there too. So the 8x-wide product, the GELU and the product of the
    halves never cross memory on their own. The state dict still holds `proj`. On both cores of a
    Zen 4 EPYC (machine I), at 4096 tokens of 320: bfloat16 21.8 -> 18.1 ms, and nearer float32
    (2.3e-3 of the norm from it, against 3.4e-3); float32 52.1 -> 34.7 ms."""

    laid_out = ("value", "gate")

    def forward(self, x):
        if not hasattr(self, "gate"):
            halves = zip(self.proj.weight.detach().chunk(2), self.proj.bias.detach().chunk(2))
            (self.value, self.value_bias), (self.gate, self.gate_bias) = ((w, b.contiguous()) for w, b in halves)
            del self.proj
        self.lay_out(rows(x), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows(x)))
        gate = torch.ops.mkldnn._linear_pointwise(x, self.gate, self.gate_bias, "gelu", [], "none")  # "none": erf
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.value, self.value_bias, "mul")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if hasattr(self, "gate"):
            destination[prefix + "proj.weight"] = torch.cat([plain(self.value), plain(self.gate)])
            destination[prefix + "proj.bias"] = torch.cat([self.value_bias, self.gate_bias])


class PackedConv1d(nn.Conv1d):
    """A 1-wide Conv1d over (B, C, N) (the ADM attention's qkv and proj_out) as the oneDNN linear it
    is over the channels: the same values, handed back as a (B, C, N) view of the (B, N, C) result.
    That layout is the gain: the ADM's q, k and v, cut from qkv's channels, then have unit stride
    in their last dimension, which PyTorch's CPU flash attention needs; without it SDPA takes its
    math path. At the ADM's 32x32 (512 channels), on a 2-core Xeon with AMX (machine G), float32:
    qkv 10.0 -> 6.3 ms, attention 45.6 -> 10.8 ms; at 16x16 (1024): 6.2 -> 6.0 and 2.8 -> 1.6 ms."""

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(
            x.transpose(1, 2), self.weight[..., 0], self.bias, "none", [], "").transpose(1, 2)


# Scores in each thread's block: 256 queries of 4096 keys at 64x64 latents, on machine I better than 128, 192,
# 384 or 512 queries.
SCORES = 1 << 20
LANES = 16  # float32 sums in an AVX-512 register: oneDNN's products run fastest on columns in multiples of it


def softmax(scores):
    """softmax over the last dimension by oneDNN, on its own tensors. On both cores of a Zen 4 EPYC (machine
    I), bfloat16: 0.22 ms a block of 256 x 4096 where PyTorch's takes 0.31, and over the text's 77 tokens
    (8 heads x 4096 queries) 0.89 ms where PyTorch's takes 2.78."""
    return scores.flatten(0, -2).to_mkldnn().softmax(-1).to_dense().view_as(scores)


class BlockedAttention(Attention):
    """Attention as oneDNN's matrix products and softmax, in blocks of scores that stay in cache, rather
    than PyTorch's CPU flash attention. A head of SCORES scores or more (the self-attention at 32x32
    latents and up) goes in blocks of SCORES for each of torch's threads, its rows of queries (the products
    share a block's rows among them); between the calls the scores stay in oneDNN's tensors (`to_mkldnn`)
    for its softmax. The values get zero columns up to a multiple of LANES, which the second product
    computes and drops. Smaller heads (the cross-attention over the text's 77 tokens, the self-attention
    at 16x16 and 8x8) go all at once: two batched products and oneDNN's softmax.
    bfloat16, 8 heads x 4096 tokens x 40 (the UNet at 64x64): on one core of the AMD EPYC (machine F), two
    oneDNN products and PyTorch's softmax took it 67 -> 151 GFLOP/s (8 x 1024 x 80: 81 -> 169). On both
    cores of a Zen 4 EPYC (machine I), the zero columns (40 -> 48) 125 -> 112 ms, then oneDNN's softmax and
    256 queries a thread 134 -> 117 ms (8 x 1024 x 80: 17.5 -> 14.4, then one block a head: 13.1 -> 11.5;
    8 x 9216 x 40, a 768 px picture, 227 queries a thread rather than 256: 522 -> 473 ms).
    All heads at once, on machine I: the cross-attention at 4096, 1024 and 256 queries 5.4 -> 2.9, 1.9 ->
    0.9 and 0.9 -> 0.5 ms, against the flash attention; the self-attention at 256 and 64 tokens 2.8 ->
    1.2 and 1.6 -> 0.2 ms, against blocks by head.
    Not in float32: on machine F 69 -> 108 GFLOP/s with AVX-512 kernels but slower with AVX2 ones
    (74 -> 65), and on machine I 166-176 ms against the flash attention's 156."""

    def attend(self, q, k, v):
        d, n = q.shape[-1], k.shape[-2]
        if q.shape[-2] * n < SCORES:
            return softmax(q @ (k.transpose(-1, -2) * d ** -0.5)) @ v
        block = SCORES * torch.get_num_threads() // n  # queries
        values = v.new_zeros(*v.shape[:2], -(-d // LANES) * LANES, n)  # (B, heads, d + zeros, N)
        values[..., :d, :] = v.transpose(-1, -2)
        out = q.new_empty(q.shape)
        # Head by head, (B, heads, ...) -> (B * heads, ...); q's heads, views of (B, N, heads * d), made
        # contiguous at once rather than block by block.
        for q_h, k_h, v_h, out_h in zip(q.contiguous().flatten(0, 1), (k * d ** -0.5).flatten(0, 1),
                                        values.flatten(0, 1), out.flatten(0, 1)):
            k_h, v_h = k_h.to_mkldnn(), v_h.to_mkldnn()  # the rows of the products' weights
            for queries, out_block in zip(q_h.split(block), out_h.split(block)):
                scores = torch.ops.aten.mkldnn_linear(queries.to_mkldnn(), k_h, None)
                out_block.copy_(torch.ops.aten.mkldnn_linear(scores.softmax(-1), v_h, None).to_dense()[:, :d])
        return out


def has_amx():
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def can_pack(dtype):
    """Whether oneDNN's packed convolutions run here in `dtype`: on x86 CPUs, and in bfloat16 only
    where oneDNN has bfloat16 kernels (AVX512-BF16 and up)."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packs(part, dtype):
    """Whether `part`'s ("unet", "vae" or DDNM's "adm") convolutions are packed (and the UNets run channels-last),
    decided per part from per-part timings, packed against plain in one process, alternating
    (`benchmarks/versus.py`, docs/performance.md):
    - The UNet, wherever oneDNN packs: a step on a 2-core AMD EPYC with AVX-512 and AVX512-BF16, no
      AMX (machine F), took 0.70-0.75 of the plain time in float32 and 0.72 in bfloat16, 0.88 under
      AVX2 kernels; on AMX machines 0.82 in bfloat16 and 0.97 in float32.
    - The VAE, only with AMX, where it was packed with the UNet when bfloat16 reached 0.40 of
      diffusers' time; on machine F packing made it slower: encode 1.09, decode 1.06 of plain.
    - DDNM's ADM, as the SD UNet: one call at 256 px on a 2-core Xeon with AMX (machine G) took
      0.87 of the plain time in float32 (0.94 under AVX2 kernels) and 0.56 in bfloat16; the SD
      UNet's float32 step took 0.82 in the same run (`benchmarks/ddnm_speed.py`)."""
    return can_pack(dtype) and (part in ("unet", "adm") or has_amx())


def blocks_attention(dtype):
    """Whether the attention runs as `BlockedAttention`: in bfloat16 where oneDNN has its kernels,
    but not with AMX, where it was not measured (a float32 version with MKL's products, machine D,
    took 157 ms against flash attention's 104)."""
    return dtype == torch.bfloat16 and can_pack(dtype) and not has_amx()


def channels_last(x):
    """`x` in channels-last memory with the usual strides. PyTorch counts a tensor with other strides in
    a dimension of size 1 as channels-last already, such as a picture read from its pixels, (1, 3, H, W)
    with a batch stride of 3; oneDNN then takes another kernel for it, and on a Zen 4 EPYC (machine I)
    the same picture gave an E(y) 8e-6 away from that of its contiguous copy."""
    _, c, h, w = x.shape
    return x if x.stride() == (c * h * w, 1, w * c, c) else x.clone(memory_format=torch.channels_last)


def channels_last_inside(module):
    """Run `module` on channels-last feature maps and hand back the default layout. The CPU
    convolutions take channels-last as it is, where the default layout is re-laid out around each
    one; at the VAE's large feature maps that is 15% of the time."""
    module.register_forward_pre_hook(lambda m, args: (channels_last(args[0]), *args[1:]))
    module.register_forward_hook(lambda m, args, out: out.contiguous())


def pack(module, convolutions, attention=False):
    """Swap in the packed modules above, in place: the linears (the feed-forward's gated GELU fused), and
    the convolutions (1-wide Conv1d ones too) and the attention too when `convolutions`, `attention`."""
    for m in module.modules():
        if type(m) is Attention and attention:
            m.__class__ = BlockedAttention
        elif type(m) is GEGLU:
            m.__class__ = FusedGEGLU  # its proj, a linear, is never called then
        elif type(m) is nn.Linear:
            m.__class__ = PackedLinear  # same parameters, another forward
        elif type(m) is nn.Conv2d and convolutions:
            m.__class__ = PackedConv2d
        elif type(m) is nn.Conv1d and convolutions and m.kernel_size == (1,) and m.groups == 1:
            m.__class__ = PackedConv1d


def fuse_upsampling(module):
    for m in module.modules():
        if type(m) is Upsample:
            m.__class__ = PackedUpsample


def speed_up(models, compile=False):
    """Make loaded `models` fast, in place: the VAE's encoder and decoder channels-last inside; on
    a CPU where oneDNN packs (`can_pack`), the linears of both models packed (the UNet's gated GELU
    fused), their convolutions where `packs` says (the UNet then channels-last inside too), the UNet's
    attention blocked where `blocks_attention` says, and the upsampling fused: the VAE's, and the
    UNet's but its deepest. Their weights are laid out at the first call on each input shape.
    With `compile` the UNet is compiled by torch.compile (once per run: its timestep is a tensor
    input) and otherwise left plain. After this the modules are for inference only: no `.to()`, no
    training, no torch.compile of one's own."""
    channels_last_inside(models.vae.encoder)
    channels_last_inside(models.vae.decoder)
    if models.device.type == "cpu" and can_pack(models.dtype):
        pack(models.vae, packs("vae", models.dtype))
        fuse_upsampling(models.vae)
        if not compile:  # a UNet to be compiled stays plain: torch.compile traces it and picks its layouts
            pack(models.unet, packs("unet", models.dtype), blocks_attention(models.dtype))
            # Its fused kernels sit beside the plain ones, which odd sizes still need. So not the
            # deepest upsampler's (8x8 -> 16x16 at 512 px, 1280 wide): 0.05 GiB more in bfloat16 (0.1
            # in float32) for no time measured, where the other two took a bfloat16 step on machine I
            # 2.42 -> 2.28 s for 0.06 GiB (docs/performance.md).
            fuse_upsampling(models.unet.up_blocks[1:])
            channels_last_inside(models.unet)
    if compile:
        # On CUDA also replayed as a CUDA graph, launched at once: eager PyTorch spends as long launching
        # the UNet's kernels as the GPU spends running them (an H100, float16, 512 px: a step 19 -> 7.7 ms,
        # a 30-step run 0.6 -> 0.3 s).
        models.unet = torch.compile(models.unet, mode="reduce-overhead" if models.device.type == "cuda" else None)
    return models


def speed_up_adm(model):
    """Make DDNM's loaded ADM UNet (ldm_min/adm.py) fast, in place, with the SD UNet's CPU speed-ups
    under the same rules, so that the paper's speed claim compares the methods, not our speed-ups
    (benchmarks/ddnm_speed.py): on a CPU where oneDNN packs, its linears packed and, where `packs`
    says, its convolutions too, on channels-last feature maps. Its attention keeps SDPA."""
    weight = next(model.parameters())
    if weight.device.type == "cpu" and can_pack(weight.dtype):
        convolutions = packs("adm", weight.dtype)
        pack(model, convolutions)
        if convolutions:
            channels_last_inside(model)
    return model
