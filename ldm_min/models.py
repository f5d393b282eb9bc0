"""The four parts of a Stable Diffusion v1.x checkpoint, built from their configs, and the
choice of device and dtype they run in."""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .errors import InputError
from .schedule import Schedule
from .unet import UNet
from .vae import VAE

SD14_CONFIGS = Path(__file__).parent / "sd14"  # the official v1.4 config.json files
PARTS = ("unet", "vae", "text_encoder", "scheduler")


def read_configs(folder=None):
    """Each part's config: the official v1.4 values, overridden by what `folder/<part>/` holds."""
    configs = {part: json.loads((SD14_CONFIGS / f"{part}.json").read_text()) for part in PARTS}
    if folder is not None:
        for part in PARTS:
            name = "scheduler_config.json" if part == "scheduler" else "config.json"
            configs[part].update(json.loads((Path(folder) / part / name).read_text()))
    return configs


def build(configs):
    """Untrained modules of the configured sizes, on the current default device (`meta` to
    allocate nothing before the weights arrive)."""
    text_cfg = CLIPTextConfig(**configs["text_encoder"], attn_implementation="sdpa")
    return UNet(configs["unet"]), VAE(configs["vae"]), CLIPTextModel(text_cfg)


def pick_device(device="auto", dtype="auto"):
    """`auto`: CUDA in float16 when there is a GPU, else the CPU in float32."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r}: use auto, cpu or cuda")
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise InputError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available to PyTorch here; use --device cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    if device == "cpu" and dtype == "float16":
        raise InputError("float16 on the CPU is slow and partly unsupported: use --dtype bfloat16 or float32")
    return torch.device(device), getattr(torch, dtype)


def available_memory(device):
    """Bytes that can still be allocated on `device`, or None where that cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


@dataclass
class Models:
    unet: UNet
    vae: VAE
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: Schedule

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    def check_memory(self, height, width):
        """Refuse an image too large for this machine before starting, rather than run out of memory.
        The VAE's peak dominates: 6.4 values per pixel for each channel of its full-resolution level
        (measured at 512 px on v1.4, where that is 128 channels: 0.8 GiB in float32); 8 leaves a margin."""
        need = 8 * self.vae.decoder.conv_out.in_channels * height * width * self.dtype.itemsize
        free = available_memory(self.device)
        if free is not None and need > free:
            raise InputError(f"a {width}x{height} image needs about {need / 2**30:.1f} GiB of memory on "
                             f"{self.device.type}, only {free / 2**30:.1f} GiB is free: make the image smaller")

    @torch.no_grad()
    def encode_text(self, prompt):
        """The text encoder's last hidden state (after its final layer norm) for `prompt`,
        padded to 77 tokens with <|endoftext|> and truncated there: (1, 77, d)."""
        n = self.tokenizer.model_max_length
        ids = self.tokenizer(prompt, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        if len(self.tokenizer(prompt, verbose=False).input_ids) > n:
            warnings.warn(f"the prompt is longer than {n} tokens; the text encoder reads only the first {n}")
        return self.text_encoder(ids.to(self.device)).last_hidden_state
