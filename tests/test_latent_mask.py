"""The latent mask M_l: thin strokes are never silently ignored, and the `cover` rule paints them."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_min import InputError, Options, images, inpaint

GOLDEN = Path(__file__).parent / "golden"
PHOTO = Image.open(GOLDEN / "astronaut128.png").convert("RGB")


def strokes():
    """A 1-pixel vertical stroke at x = 3 and a 3-pixel one across the middle (rows 61-63): neither
    holds a pixel (8i, 8j), so the paper's rule finds no latent hole at all."""
    hole = np.zeros((128, 128), bool)
    hole[:, 3] = True
    hole[61:64, :] = True
    return hole


def mask_image(hole):
    return Image.fromarray(hole.astype(np.uint8) * 255)


def as_tensor(hole):
    return torch.from_numpy(hole).float()[None, None]


def warnings_of(hole, **options):
    """The warnings that inpainting `hole` raises, without running the models."""
    options = Options(**options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images.check_latent_hole(as_tensor(hole), images.latent_known_mask(as_tensor(hole), options.dilate,
                                                                             options.latent_mask))
    return [str(w.message) for w in caught]


def test_strokes_between_the_grid_are_a_warning_with_their_count():
    hole = strokes()
    assert hole.sum() == 128 + 3 * 128 - 3
    assert images.latent_known_mask(as_tensor(hole), 2, "nearest").min() == 1  # no latent hole at all
    [message] = warnings_of(hole)
    assert message.startswith("509 of 509 hole pixels (100%) fall between the 8-pixel latent grid")
    assert "--latent-mask cover" in message


def test_a_partly_covered_hole_counts_the_pixels_outside_the_latent_hole():
    hole = np.zeros((32, 32), bool)
    hole[4:20, 4:20] = True  # samples (8, 8) .. (16, 16) are holes: cells of pixels 8..23 are covered
    [message] = warnings_of(hole, dilate=0)
    assert message.startswith(f"{16 * 16 - 12 * 12} of {16 * 16} hole pixels (44%)")


@pytest.mark.parametrize("side", [168, 136])
def test_the_papers_masks_are_covered_and_say_nothing(side):
    hole = np.zeros((512, 512), bool)
    start = (512 - side) // 2  # a centred square, off the 8-pixel grid: dilation covers its edges
    hole[start:start + side, start:start + side] = True
    assert warnings_of(hole) == []


def test_cover_puts_every_stroke_pixel_in_the_latent_hole():
    hole = strokes()
    M_l = images.latent_known_mask(as_tensor(hole), 0, "cover")
    known_pixels = torch.nn.functional.interpolate(M_l, scale_factor=8)[0, 0].numpy() == 1
    assert not (known_pixels & hole).any()
    assert warnings_of(hole, latent_mask="cover") == []


def test_cover_repaints_the_strokes_that_nearest_leaves(tiny):
    hole = strokes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nearest, cover = (np.asarray(inpaint(PHOTO, mask_image(hole), tiny, Options(steps=3, latent_mask=rule)),
                                     np.int16) for rule in ("nearest", "cover"))
    # nearest keeps E(y) everywhere; cover samples new content in the strokes' cells
    assert np.abs(cover - nearest)[hole].mean() > 10


def test_a_hole_of_whole_cells_gives_the_same_picture_under_both_rules(tiny):
    hole = np.zeros((128, 128), bool)
    hole[40:88, 24:72] = True  # 8x8 cells on the grid
    nearest, cover = (np.asarray(inpaint(PHOTO, mask_image(hole), tiny, Options(steps=3, latent_mask=rule)))
                      for rule in ("nearest", "cover"))
    assert np.array_equal(nearest, cover)


def test_a_hole_over_the_whole_image_is_unconditional_generation_said_once():
    hole = np.ones((64, 64), bool)
    hole[:8, :8] = False  # almost the whole image: the dilated latent hole covers it all
    [message] = warnings_of(hole)
    assert "unconditional generation" in message


def test_an_unknown_latent_mask_rule_is_refused():
    with pytest.raises(InputError, match="latent mask rule must be nearest or cover, got 'any'"):
        Options(latent_mask="any")
