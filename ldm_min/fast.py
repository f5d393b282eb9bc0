"""What makes the models fast, in one place, applied after loading: the model files show the
architecture only. Each speed-up computes what the plain modules compute (tests/test_fast.py)."""
import torch
import torch.nn.functional as F
from torch import nn


class MatmulConv2d(nn.Conv2d):
    """A stride-1, size-keeping convolution that does small float32 feature maps on the CPU as one
    matrix product over unfolded patches. PyTorch's CPU convolution (oneDNN) re-lays out the
    weights on every call; on the UNet's 8x8 and 16x16 maps that costs more than the arithmetic,
    and the matrix product, which reads the weights as they are, is 1.1-3x faster there (a 512x512
    float32 UNet step: 10% faster). In bfloat16 the arithmetic dominates: nothing to gain."""

    SMALL = 512  # batch * height * width up to which the matrix product wins (measured, float32)

    def forward(self, x):
        b, _, h, w = x.shape
        if x.device.type != "cpu" or x.dtype != torch.float32 or b * h * w > self.SMALL:
            return super().forward(x)
        patches = F.unfold(x, self.kernel_size, padding=self.padding)  # (B, C_in * k * k, H * W)
        return (self.weight.flatten(1) @ patches + self.bias[:, None]).unflatten(-1, (h, w))


def between_feature_maps(conv):
    """Stride 1, size-keeping, and wide on both sides: not one of the thin convolutions into and
    out of the image (3 channels), the latent (4) or its moments (8), which have little to gain."""
    size_keeping = conv.stride == (1, 1) and conv.padding == tuple(k // 2 for k in conv.kernel_size)
    return size_keeping and min(conv.in_channels, conv.out_channels) > 8


def channels_last_inside(module):
    """Run `module` on channels-last feature maps and hand back the default layout. The CPU
    convolutions take channels-last as it is, where the default layout is re-laid out around each
    one; at the VAE's large feature maps that is 15% of the time."""
    module.register_forward_pre_hook(
        lambda m, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
    module.register_forward_hook(lambda m, args, out: out.contiguous())


def speed_up(models, compile=False):
    """Make loaded `models` fast, in place: each convolution between feature maps a
    `MatmulConv2d`, the VAE's encoder and decoder channels-last inside (and the UNet, weights
    too, in bfloat16 on the CPU), and with `compile` the UNet compiled by torch.compile (once per
    run: its timestep is a tensor input)."""
    for module in (*models.unet.modules(), *models.vae.modules()):
        if type(module) is nn.Conv2d and between_feature_maps(module):
            module.__class__ = MatmulConv2d  # same parameters, another forward
    channels_last_inside(models.vae.encoder)
    channels_last_inside(models.vae.decoder)
    if models.device.type == "cpu" and models.dtype == torch.bfloat16:
        # oneDNN's bfloat16 convolutions want weights and feature maps both channels-last: with AMX a
        # UNet step took 1.03 s against 1.19 in the default layout. In float32 it gains nothing.
        channels_last_inside(models.unet.to(memory_format=torch.channels_last))
    if compile:
        # On CUDA also replayed as a CUDA graph, launched at once: eager PyTorch spends as long launching
        # the UNet's kernels as the GPU spends running them (an H100, float16, 512 px: a step 19 -> 7.7 ms,
        # a 30-step run 0.6 -> 0.3 s).
        models.unet = torch.compile(models.unet, mode="reduce-overhead" if models.device.type == "cuda" else None)
    return models
