"""The parts of a Stable Diffusion v1.x checkpoint, ready to sample with (`weights.load_models`
builds and loads them), and what they are asked besides sampling: text embeddings, memory."""
import warnings
from dataclasses import dataclass

import torch

from .errors import InputError
from .schedule import Schedule
from .unet import UNet
from .vae import VAE


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
    text_encoder: torch.nn.Module  # transformers' CLIPTextModel, not imported: `import ldm_min` stays quick
    tokenizer: object              # transformers' CLIPTokenizer
    schedule: Schedule
    device: torch.device  # where every part's weights are
    dtype: torch.dtype    # and their dtype: the compute dtype of the models, not of the sampler

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
