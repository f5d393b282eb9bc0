"""The noise-prediction network eps_theta(z_t, t, c) of Stable Diffusion v1.x.

Every width, depth and head count comes from the checkpoint's `unet/config.json`; the same
code builds the full v1.4 model and the small test checkpoints.
"""
import torch.nn.functional as F
from torch import nn

from .layers import Attention, Block, ResnetBlock, timestep_embedding


class GEGLU(nn.Module):
    """Linear to twice the width; one half gates the other through GELU."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention over the text, feed-forward; each pre-normed and residual."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        # net.1 was a dropout layer in training; Identity keeps the indices of the file's names.
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs a TransformerBlock over the pixels of a feature map (`Transformer2DModel`)."""

    def __init__(self, channels, heads, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # eps of the official model code
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = t.transpose(1, 2).reshape(b, c, h, w)  # (B, HW, C) -> (B, C, H, W)
        return x + self.proj_out(t)


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths, n = cfg["block_out_channels"], cfg["layers_per_block"]
        groups, eps, temb = cfg["norm_num_groups"], cfg["norm_eps"], 4 * widths[0]
        transformer = lambda c: SpatialTransformer(c, cfg["attention_head_dim"], cfg["cross_attention_dim"], groups)
        attention = lambda kind: transformer if kind.startswith("CrossAttn") else None  # by block type

        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(widths[0], temb)
        self.time_embedding.linear_2 = nn.Linear(temb, temb)
        self.conv_in = nn.Conv2d(cfg["in_channels"], widths[0], 3, padding=1)

        # The way down pushes its outputs onto a stack of skip maps: conv_in's, each ResNet
        # block's (after its transformer), each downsampler's. Their widths, in push order:
        skip_widths = [widths[0]]
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg["down_block_types"]):
            lowest = i == len(widths) - 1  # no downsampler below the lowest level
            self.down_blocks.append(Block(widths[max(i - 1, 0)], widths[i], n, groups, eps, temb_channels=temb,
                                          attention=attention(kind), down=not lowest))
            skip_widths += [widths[i]] * (n if lowest else n + 1)

        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList(ResnetBlock(widths[-1], widths[-1], groups, eps, temb) for _ in range(2))
        self.mid_block.attentions = nn.ModuleList([transformer(widths[-1])])

        # The way up mirrors it: each level has n + 1 ResNet blocks, each popping one skip map
        # (the last pushed first), and every level but the top one upsamples.
        up_widths = widths[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg["up_block_types"]):
            top = i == len(widths) - 1
            skips = [skip_widths.pop() for _ in range(n + 1)]
            self.up_blocks.append(Block(up_widths[max(i - 1, 0)], up_widths[i], n + 1, groups, eps, temb_channels=temb,
                                        attention=attention(kind), skip_channels=skips, up=not top))

        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps)
        self.conv_out = nn.Conv2d(widths[0], cfg["out_channels"], 3, padding=1)

    def forward(self, z, t, context):
        """z: (B, 4, h, w) latents, t: the integer timestep (or a 0-d tensor), context: (B, 77, d) text embedding."""
        temb = timestep_embedding(t, self.conv_in.out_channels).to(z.device, z.dtype)
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(temb)))

        x = self.conv_in(z)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, context, keep=skips)

        mid = self.mid_block
        x = mid.resnets[1](mid.attentions[0](mid.resnets[0](x, temb), context), temb)

        for block in self.up_blocks:
            n = len(block.resnets)
            # The upsampler meets the next skip map: its size, not 2x, is the output size.
            out_size = skips[-n - 1].shape[-2:] if len(skips) > n else None
            x = block(x, temb, context, skips, out_size)

        return self.conv_out(F.silu(self.conv_norm_out(x)))
