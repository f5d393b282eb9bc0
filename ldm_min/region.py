"""Big photos (`--region auto`): inpaint a crop around the hole at the model's scale, stitch it back.

Stable Diffusion v1 was trained on 512x512 pictures and paints repeated, incoherent content far
above that scale, at a cost that grows with the area. So above FULL_UP_TO pixels a side, only a
square-ish crop around the hole is inpainted, scaled so that its long side is 512, and the result
is scaled back and blended over the hole. Every pixel outside the crop is the input's.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import images

REGIONS = ("auto", "full")
MODEL_SIDE = 512   # the training resolution of SD v1 (and the paper's crop size)
FULL_UP_TO = 768   # --region auto inpaints images up to this many pixels a side whole, as the paper does
FEATHER = 8        # model-scale pixels (one latent cell) over which the result blends into the photo


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    width: int
    height: int

    @property
    def scale(self):
        """The factor that brings the crop to the model's scale: its long side to 512, never up."""
        return min(1.0, MODEL_SIDE / max(self.width, self.height))

    @property
    def slices(self):
        """The crop of an image or mask tensor: x[box.slices]."""
        return ..., slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def __str__(self):
        return f"region {self.width}x{self.height} at ({self.left}, {self.top}), scaled {self.scale:.2f}x"


def crop_box(hole, margin):
    """The crop around every hole pixel of `hole` (1, 1, H, W): a square centred on the holes'
    bounding box, of side max(512, B * 512 / (512 - 2 margin)), B the box's long side, so that at
    the model's scale the box has at least `margin` pixels of context on each side; then shifted
    into the image and clipped to it. One crop for all holes, however far apart."""
    H, W = hole.shape[-2:]
    rows, cols = hole[0, 0].any(1).nonzero()[:, 0], hole[0, 0].any(0).nonzero()[:, 0]
    top, bottom, left, right = rows[0].item(), rows[-1].item() + 1, cols[0].item(), cols[-1].item() + 1
    side = max(MODEL_SIDE, math.ceil(max(bottom - top, right - left) * MODEL_SIDE / (MODEL_SIDE - 2 * margin)))
    width, height = min(side, W), min(side, H)
    x = min(max(round((left + right - width) / 2), 0), W - width)
    y = min(max(round((top + bottom - height) / 2), 0), H - height)
    return Box(x, y, width, height)


def box_for(hole, options):
    """The Box to inpaint, or None for the whole image (`--region full`, or a small enough image)."""
    if options.region == "full" or max(hole.shape[-2:]) <= FULL_UP_TO:
        return None
    return crop_box(hole, options.region_margin)


def resized(x, size):
    """An image tensor (1, 3, h, w) in [-1, 1] resized to size = (w, h) by Pillow's Lanczos filter."""
    return images.to_tensor(images.to_pil(x).resize(size, Image.LANCZOS))


def resized_hole(hole, size):
    """A hole (1, 1, h, w) resized to size = (w, h): a pixel is a hole where any hole pixel falls in
    its footprint (Pillow's box filter, then > 0), so that no stroke is lost on the way down."""
    grey = Image.fromarray(hole[0, 0].numpy().astype(np.uint8) * 255).resize(size, Image.BOX)
    return torch.from_numpy(np.asarray(grey) > 0).float()[None, None]


def scaled_crop(x, hole, box):
    """The crop `box` of x (1, 3, H, W) and of hole (1, 1, H, W), at the model's scale."""
    size = (round(box.width * box.scale), round(box.height * box.scale))
    return resized(x[box.slices], size), resized_hole(hole[box.slices], size)


def paste_crop(x, hole, box, result):
    """x with `result`, the crop `box` inpainted at the model's scale, scaled back and blended over
    the hole (feathered over FEATHER model-scale pixels); every pixel outside the crop is x's."""
    out = x.clone()
    result = resized(result, (box.width, box.height))
    out[box.slices] = images.paste_back(result, x[box.slices], hole[box.slices], round(FEATHER / box.scale))
    return out
