"""Building blocks shared by the UNet and the VAE.

Attribute names mirror the tensor names of the official checkpoint (`norm1`, `conv1`,
`time_emb_proj`, `to_q`, ...), so a state dict loads into these modules as it is.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the integer timestep t, cos half first (`flip_sin_to_cos: true`,
    `freq_shift: 0` in the UNet config): freqs = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1."""
    half = dim // 2
    t = torch.as_tensor(t, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.reshape(-1, 1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, plus a skip (1x1 conv when the width changes).
    The UNet adds a projection of the timestep embedding between the two convolutions;
    the VAE's blocks have none (`temb_channels=None`)."""

    def __init__(self, cin, cout, groups, eps, temb_channels=None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb=None):
        # In-place where a tensor has no other use: the VAE decoder's peak memory at full
        # resolution is a handful of these feature maps.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        if temb is not None:
            h += self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = F.silu(self.norm2(h), inplace=True)  # conv1's output is freed before conv2 makes its own
        h = self.conv2(h)
        return h.add_(self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x)


class Downsample(nn.Module):
    """3x3 convolution with stride 2. The UNet pads by 1 on every side; the VAE encoder pads
    only right and bottom by 1 (docs/conventions.md), which matters for the exact output."""

    def __init__(self, channels, asymmetric):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x):
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (twice the input, or the size of the skip
    connection it meets, which differs when a side was odd), then a 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        x = F.interpolate(x, size=size or (2 * x.shape[-2], 2 * x.shape[-1]), mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention of queries from x over keys/values from
    `context` (self-attention when context is None)."""

    def __init__(self, dim, heads, context_dim=None, qkv_bias=False):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # the file names it `to_out.0`

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, N, heads * d) -> (B, heads, N, d)
        q, k, v = (a.unflatten(-1, (self.heads, -1)).transpose(1, 2) for a in (q, k, v))
        return self.to_out(self.attend(q, k, v).transpose(1, 2).flatten(2))

    def attend(self, q, k, v):
        """softmax(q k^T / sqrt(d)) v for each head: (B, heads, N, d)."""
        return F.scaled_dot_product_attention(q, k, v)


class Block(nn.Module):
    """One resolution level of the UNet or the VAE: `n` ResNet blocks, each followed by an
    attention module when `attention` (channels -> module) is given, then an optional down- or
    upsampler. On the UNet's way up, each ResNet block first concatenates one skip connection;
    `skip_channels` gives their widths."""

    def __init__(self, cin, cout, n, groups, eps, temb_channels=None, attention=None, skip_channels=None,
                 down=False, asymmetric_pad=False, up=False):
        super().__init__()
        skips = skip_channels or [0] * n
        self.resnets = nn.ModuleList(
            ResnetBlock((cin if i == 0 else cout) + skips[i], cout, groups, eps, temb_channels) for i in range(n))
        if attention:
            self.attentions = nn.ModuleList(attention(cout) for _ in range(n))
        if down:
            self.downsamplers = nn.ModuleList([Downsample(cout, asymmetric_pad)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x, temb=None, context=None, skips=None, out_size=None, keep=None):
        """`skips`: feature maps to concatenate, taken from the end (the UNet's way up). `keep`: a
        list that collects each layer's output for those skip connections (its way down)."""
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)
            if keep is not None:
                keep.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            if keep is not None:
                keep.append(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, out_size)
        return x
