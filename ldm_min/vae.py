"""The VAE of Stable Diffusion v1.x: E (image -> latent posterior mean) and D (latent -> image).

Widths and depths come from the checkpoint's `vae/config.json`.
"""
import torch.nn.functional as F
from torch import nn

from .layers import Attention, Block, ResnetBlock

GROUPNORM_EPS = 1e-6  # the official VAE code's value; its config.json does not carry one


class SelfAttention(Attention):
    """Single-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels, groups):
        super().__init__(channels, heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, GROUPNORM_EPS)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        return x + super().forward(t).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, GROUPNORM_EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths, n, groups = cfg["block_out_channels"], cfg["layers_per_block"], cfg["norm_num_groups"]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg["in_channels"], widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Block(widths[max(i - 1, 0)], widths[i], n, groups, GROUPNORM_EPS, down=i < last, asymmetric_pad=True)
            for i in range(last + 1))
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], GROUPNORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg["latent_channels"], 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths, n, groups = cfg["block_out_channels"][::-1], cfg["layers_per_block"], cfg["norm_num_groups"]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg["latent_channels"], widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            Block(widths[max(i - 1, 0)], widths[i], n + 1, groups, GROUPNORM_EPS, up=i < last) for i in range(last + 1))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], GROUPNORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg["out_channels"], 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """`encode` gives E(x) = scaling_factor * posterior mean; `decode` gives D(z / scaling_factor)."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg["latent_channels"]
        self.scaling_factor = cfg["scaling_factor"]
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)
        self.decoder = Decoder(cfg)

    def encode(self, x):
        """x: (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8). The mean, never a sample (docs/conventions.md)."""
        mean = self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]
        return self.scaling_factor * mean

    def decode(self, z):
        """z: (B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) in [-1, 1] (unclamped)."""
        return self.decoder(self.post_quant_conv(z / self.scaling_factor))
