"""The modules built from the official v1.4 configs have exactly the checkpoint's tensors."""
import json
from pathlib import Path

import pytest
import torch

from weights import IGNORED, RENAMES, build, read_configs

KEYS = Path(__file__).parent / "sd14"


def official_keys(part):
    """name -> shape from the listing of the full-size v1.4 file, after the declared renames and
    without the declared ignored buffer."""
    shapes = {}
    for line in (KEYS / f"{part}_keys.tsv").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape = line.split("\t")
        for old, new in RENAMES.get(part, []):
            name = name.replace(old, new)
        if name not in IGNORED.get(part, ()):
            shapes[name] = json.loads(shape)
    return shapes


@pytest.fixture(scope="module")
def full_size():
    with torch.device("meta"):
        return build(read_configs())


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_full_size_modules_have_the_official_tensor_names_and_shapes(full_size, part):
    ours = {name: list(t.shape) for name, t in full_size[part].state_dict().items()}
    assert ours == official_keys(part)


def test_unet_has_860m_parameters(full_size):
    assert sum(p.numel() for p in full_size["unet"].parameters()) == 859_520_964


@pytest.mark.parametrize("h, w", [(7, 9), (8, 12), (5, 5), (1, 3), (13, 6)])
def test_unet_accepts_any_latent_size(tiny, h, w):
    z = torch.randn(1, 4, h, w, device=tiny.device)
    eps = tiny.unet(z, 500, tiny.encode_text(""))
    assert eps.shape == z.shape and torch.isfinite(eps).all()
