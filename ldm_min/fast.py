"""What makes the models fast, in one place, applied after loading: the model files show the
architecture only. Each speed-up computes what the plain modules compute (tests/test_fast.py)."""
import ctypes
import platform
import sys

import torch
from torch import nn

# glibc keeps freed heap memory for reuse, and only malloc_trim hands it back to the system.
malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None


class PackedConv2d(nn.Conv2d):
    """A CPU convolution whose weights oneDNN lays out for its kernels once, at the first call, and
    not again at every call as `F.conv2d` does. On channels-last feature maps it computes exactly
    what `nn.Conv2d` computes, and its state dict holds the plain weights. It pays most where the
    weights outweigh the feature maps: a 1280-wide 3x3 convolution at 8x8 took 5.8 -> 1.4 ms in
    bfloat16, and 26 -> 6.5 ms in float32."""

    def forward(self, x):
        if not self.weight.is_mkldnn:
            # Laid out for this input's size, which picks the kernel: packed without it, a float32
            # 512x512 UNet step took 3.9 s, against 3.1 (and 4.3 unpacked).
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), self.padding, self.stride, self.dilation, self.groups, x.shape)
            self.weight = nn.Parameter(packed, requires_grad=False)
            if malloc_trim:
                # The plain weights are freed now, but glibc would keep most of them, and the VAE
                # decoder's large maps do not reuse that memory: bfloat16 peaked 0.3 GiB higher.
                malloc_trim(0)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self.weight.to_dense()


def can_pack(dtype):
    """Whether oneDNN's packed convolutions run here in `dtype`: on x86 CPUs, and in bfloat16 only
    where oneDNN has bfloat16 kernels (AVX512-BF16 and up)."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packs(dtype):
    """Whether the CPU convolutions are packed (and the UNet runs channels-last): only where that was
    measured to pay, on CPUs with AMX. Measured end to end at 512x512, side by side:
    - 2-core Intel Xeon with AMX: a bfloat16 UNet step 1.07 -> 0.88 s, float32 3.53 -> 3.44 s.
    - 2-core AMD EPYC with AVX-512 and AVX512-BF16, no AMX: no gain; float32 27.8 s against 25.6 s
      unpacked (2 steps), bfloat16 18.0-18.5 s against 17.2-18.2 s (4 steps).
    Laptops (AVX2) were never measured faster, so they keep the plain path too."""
    return can_pack(dtype) and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def channels_last_inside(module):
    """Run `module` on channels-last feature maps and hand back the default layout. The CPU
    convolutions take channels-last as it is, where the default layout is re-laid out around each
    one; at the VAE's large feature maps that is 15% of the time."""
    module.register_forward_pre_hook(
        lambda m, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
    module.register_forward_hook(lambda m, args, out: out.contiguous())


def pack_convolutions(module):
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PackedConv2d  # same parameters, another forward


def speed_up(models, compile=False):
    """Make loaded `models` fast, in place: the VAE's encoder and decoder channels-last inside; on
    the CPU every convolution a `PackedConv2d`, and the UNet channels-last inside too; with `compile`
    the UNet compiled by torch.compile (once per run: its timestep is a tensor input). After this the
    modules are for inference only: no `.to()`, no training, no torch.compile of one's own."""
    channels_last_inside(models.vae.encoder)
    channels_last_inside(models.vae.decoder)
    if models.device.type == "cpu" and packs(models.dtype):
        pack_convolutions(models.vae)
        if not compile:  # a UNet to be compiled stays plain: torch.compile traces it and picks its layouts
            pack_convolutions(models.unet)
            channels_last_inside(models.unet)
    if compile:
        # On CUDA also replayed as a CUDA graph, launched at once: eager PyTorch spends as long launching
        # the UNet's kernels as the GPU spends running them (an H100, float16, 512 px: a step 19 -> 7.7 ms,
        # a 30-step run 0.6 -> 0.3 s).
        models.unet = torch.compile(models.unet, mode="reduce-overhead" if models.device.type == "cuda" else None)
    return models
