"""The noise network of DDNM, the paper's baseline: guided-diffusion's ADM UNet (Dhariwal & Nichol,
"Diffusion Models Beat GANs on Image Synthesis"), as in `256x256_diffusion_uncond.pt`.

Read from openai/guided-diffusion's unet.py and nn.py. Every width, depth and attention level comes
from the checkpoint's own tensors (`weights.adm_config`); the same code builds the full model and
the small test checkpoints. Attribute names are the file's tensor names (input_blocks.N.M,
in_layers, emb_layers, out_layers, qkv ...), so its state dict loads as it is.

In half precision every layer runs in the model's dtype but the GroupNorms, which compute in float32
as guided-diffusion's do (its --use_fp16 keeps the timestep MLPs and the output layers in float32 too).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .layers import timestep_embedding  # guided-diffusion's nn.timestep_embedding: the same, cos half first

# The flags of the 256x256 models (guided-diffusion's README): --num_head_channels 64, and their
# training schedule, --noise_schedule linear --diffusion_steps 1000: beta from 1e-4 to 0.02
# (gaussian_diffusion.get_named_beta_schedule). Neither can be read from the weights.
HEAD_CHANNELS = 64
SCHEDULE = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}
GROUPS = 32  # nn.py's `normalization`: GroupNorm32(32, channels), torch's default eps 1e-5

RESAMPLE = {"down": lambda x: F.avg_pool2d(x, 2), "up": lambda x: F.interpolate(x, scale_factor=2, mode="nearest")}


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the model's dtype, as guided-diffusion's is."""

    def __init__(self, channels):
        super().__init__(GROUPS, channels)

    def forward(self, x):
        return F.group_norm(x.float(), GROUPS, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; the timestep embedding scales and shifts the second GroupNorm's
    output (`use_scale_shift_norm`); SiLU, 3x3 conv; plus a skip (1x1 conv when the width changes).
    A `resample` block ("down": 2x2 average, "up": nearest 2x) resizes both paths between the first
    SiLU and conv (`resblock_updown`): the ADM's only down- and upsamplers."""

    def __init__(self, cin, cout, emb_channels, resample=None):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * cout))  # a scale and a shift
        # out_layers.2 was a dropout layer in training; Identity keeps the indices of the file's names.
        self.out_layers = nn.Sequential(GroupNorm32(cout), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.resample = resample

    def forward(self, x, emb):
        norm, silu, conv = self.in_layers
        h = silu(norm(x))
        if self.resample:
            h, x = RESAMPLE[self.resample](h), RESAMPLE[self.resample](x)
        h = conv(h)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)


class AttentionBlock(nn.Module):
    """Self-attention over the pixels, HEAD_CHANNELS channels a head, residual. `qkv` is one 1x1
    convolution whose output holds each head's q, k and v in turn (guided-diffusion's legacy order:
    split into heads, then into q, k, v)."""

    def __init__(self, channels):
        super().__init__()
        self.heads = channels // HEAD_CHANNELS
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x.flatten(2)))  # (B, heads * 3 * d, HW)
        q, k, v = qkv.unflatten(1, (self.heads, 3, -1)).transpose(-1, -2).unbind(2)  # each (B, heads, HW, d)
        # Softmax(q k^T / sqrt(d)) v; guided-diffusion scales q and k by d^(-1/4) each: the same product.
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).flatten(1, 2)  # (B, C, HW)
        return x + self.proj_out(out).reshape(b, c, h, w)


class Step(nn.Sequential):
    """One numbered entry of input_blocks, middle_block or output_blocks: its layers in order, the
    ResBlocks given the timestep embedding too (`TimestepEmbedSequential`)."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADM(nn.Module):
    """cfg: in_channels, out_channels (6: eps and the learned variance's interpolation), model_channels
    (the timestep embedding's width), widths (one per level), num_res_blocks (per level, on the way
    down), attention_levels (the levels with attention, e.g. 32, 16 and 8 px at 256)."""

    def __init__(self, cfg):
        super().__init__()
        widths, n, emb = cfg["widths"], cfg["num_res_blocks"], 4 * cfg["model_channels"]
        attend = lambda level, c: [AttentionBlock(c)] if level in cfg["attention_levels"] else []
        self.time_embed = nn.Sequential(nn.Linear(cfg["model_channels"], emb), nn.SiLU(), nn.Linear(emb, emb))

        # The way down pushes each step's output onto a stack of skip maps; their widths, in push order:
        self.input_blocks = nn.ModuleList([Step(nn.Conv2d(cfg["in_channels"], widths[0], 3, padding=1))])
        skip_widths, c = [widths[0]], widths[0]
        for level, width in enumerate(widths):
            for _ in range(n):
                self.input_blocks.append(Step(ResBlock(c, width, emb), *attend(level, width)))
                c = width
                skip_widths.append(c)
            if level < len(widths) - 1:  # every level but the lowest halves the size
                self.input_blocks.append(Step(ResBlock(c, c, emb, "down")))
                skip_widths.append(c)

        self.middle_block = Step(ResBlock(c, c, emb), AttentionBlock(c), ResBlock(c, c, emb))

        # The way up mirrors it: n + 1 steps a level, each concatenating one skip map (the last
        # pushed first); the last step of every level but the top one doubles the size.
        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(n + 1):
                layers = [ResBlock(c + skip_widths.pop(), width, emb), *attend(level, width)]
                c = width
                if level > 0 and i == n:
                    layers.append(ResBlock(c, c, emb, "up"))
                self.output_blocks.append(Step(*layers))

        self.out = nn.Sequential(GroupNorm32(c), nn.SiLU(), nn.Conv2d(c, cfg["out_channels"], 3, padding=1))

    def forward(self, x, t):
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of 2^(levels - 1); t: (B,) timesteps of the
        1000-step schedule. Returns (B, 6, H, W): eps, then the learned variance's interpolation."""
        emb = self.time_embed(timestep_embedding(t, self.time_embed[0].in_features).to(x.device, x.dtype))
        skips = []
        for step in self.input_blocks:
            x = step(x, emb)
            skips.append(x)
        x = self.middle_block(x, emb)
        for step in self.output_blocks:
            x = step(torch.cat([x, skips.pop()], dim=1), emb)
        return self.out(x)
