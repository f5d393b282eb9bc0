"""Pictures in and out: opening files, masks, the latent mask M_l, padding, paste-back.

The conventions (docs/conventions.md): any image mode becomes RGB in [-1, 1]; a mask pixel is a hole
(to be painted) where its grey value is >= 128; EXIF orientation is applied to both files.
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

MIN_SIDE = 8  # one latent pixel


def open_image(path, what="image", upright=True):
    """Open and fully decode an image file, upright (EXIF orientation applied) unless `upright` is
    False: then as stored, as Pillow's Image.open gives it (benchmarks/table1.py --protocol authors)."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im) if upright else im.copy()  # a copy outlives the file
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder, not an image file") from None
    except Image.DecompressionBombError:
        raise InputError(f"{what} {path}: too many pixels to be a photo (Pillow's decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} {path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} {path}: damaged or truncated image ({e})") from None


# Modes Pillow converts to one other mode only: LAB (TIFF) to RGB, premultiplied La to LA.
VIA = {"LAB": "RGB", "La": "LA"}


def eight_bit(im, what="image"):
    """`im` in a mode whose conversion to RGB and to LA keeps the picture. 16- and 32-bit integer
    greys are scaled to 8 bits, and 32-bit float greys (TIFF mode F, in [0, 1] as scientific and HDR
    tools write them) too: Pillow's own conversion would clip both, the float ones to black. A float
    image outside [0, 1] has no scale to read it at, and is refused."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        outside = values[~((values >= 0) & (values <= 1))]  # NaN included
        if outside.size:
            raise InputError(f"{what}: a 32-bit float picture must hold values from 0 to 1, this one holds "
                             f"{outside[0]:g}: scale it to [0, 1], or save it in 8 bits")
        return Image.fromarray((values * 255).round().astype(np.uint8))
    return im.convert(VIA[im.mode]) if im.mode in VIA else im


def prepare(image, mask, invert_mask=False):
    """The image and its hole, checked: x (1, 3, H, W) float32 in [-1, 1] and hole (1, 1, H, W),
    1 = paint here. A mask pixel is a hole where its grey value is >= 128, transparent pixels
    counting as black; `invert_mask` swaps that."""
    image, mask = eight_bit(image).convert("RGB"), eight_bit(mask, "mask")
    grey, alpha = mask.convert("LA").split()  # a transparent mask pixel is known, whatever its colour
    if mask.size != image.size:
        raise InputError(f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}: "
                         f"they must be the same size")
    if min(image.size) < MIN_SIDE:
        raise InputError(f"image is {image.size[0]}x{image.size[1]}: each side must be at least {MIN_SIDE} pixels")
    hole = np.asarray(grey, np.uint16) * np.asarray(alpha) // 255 >= 128
    if invert_mask:
        hole = ~hole
    if not hole.any():
        raise InputError("the mask marks no pixel to paint: white (>= 128) marks the hole"
                         + ("" if invert_mask else "; use --invert-mask if black marks it in yours"))
    return to_tensor(image), torch.from_numpy(hole).float()[None, None]


def to_tensor(image):
    """PIL RGB -> (1, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None].div_(127.5).sub_(1)


def to_pil(x):
    """(1, 3, H, W) in [-1, 1] -> PIL RGB: clamp, round((x + 1) * 127.5)."""
    x = x[0].clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)  # one float copy: a big photo is big
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())


def pad_to_8(x, hole):
    """Pad right and bottom to multiples of 8: the image by reflection, the mask with 0 (known)."""
    ph, pw = -x.shape[-2] % 8, -x.shape[-1] % 8
    return F.pad(x, (0, pw, 0, ph), mode="reflect"), F.pad(hole, (0, pw, 0, ph))


LATENT_MASK_RULES = ("nearest", "cover")


def latent_known_mask(hole, dilate, rule):
    """M_l, 1 = known, from the pixel hole (sides multiples of 8). Each latent pixel stands for an
    8x8 cell of pixels; it is a hole, by rule `nearest` (the paper's), where the cell's top-left
    pixel (8i, 8j) is, or by rule `cover` where any pixel of the cell is. Then the hole grows by
    `dilate` latent pixels. `nearest` can miss strokes thinner than a cell; `cover` cannot."""
    if rule == "nearest":
        hole_l = F.interpolate(hole, (hole.shape[-2] // 8, hole.shape[-1] // 8), mode="nearest")
    else:
        hole_l = F.max_pool2d(hole, 8)
    dilate = min(dilate, max(hole_l.shape[-2:]))  # the longest side reaches every pixel: more changes nothing
    hole_l = F.max_pool2d(hole_l, 2 * dilate + 1, stride=1, padding=dilate)
    return 1 - hole_l


def check_latent_hole(hole, M_l):
    """Warn about what the latent mask will not do: repaint hole pixels that fall outside the latent
    hole, or keep anything when no latent pixel is known (then sampling is unconditional)."""
    missed = int((hole * F.interpolate(M_l, scale_factor=8, mode="nearest")).sum())
    if missed:
        total = int(hole.sum())
        share = f"{missed / total:.0%}" if missed / total >= 0.01 else "<1%"
        warnings.warn(f"{missed} of {total} hole pixels ({share}) fall between the 8-pixel latent grid and will not "
                      f"be repainted; use --latent-mask cover (API: Options(latent_mask=\"cover\"))")
    if not M_l.any():
        warnings.warn("the hole covers the whole latent image: nothing of the picture is kept, so this is "
                      "unconditional generation (text-to-image with --prompt)")


def paste_back(result, x, hole, feather=0):
    """The original pixels over `result` wherever they are known. With feather > 0, the blend
    ramps from the result to the original over `feather` pixels on the known side of the edge."""
    weight = hole  # 1 = take the result
    if feather > 0:
        # Distance (in pixels, chessboard metric) from each known pixel to the nearest hole,
        # by growing the hole one pixel at a time, up to `feather` pixels.
        grown, weight = hole, hole.clone()
        for d in range(1, min(feather, max(hole.shape[-2:])) + 1):  # no pixel is further than the longest side
            grown = F.max_pool2d(grown, 3, stride=1, padding=1)
            weight = torch.maximum(weight, grown * (1 - d / (feather + 1)))
    return weight * result + (1 - weight) * x
