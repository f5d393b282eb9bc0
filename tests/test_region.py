"""Big photos: a crop around the hole at the model's scale, and every other pixel kept."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_min import InputError, Options, inpaint, region

GOLDEN = Path(__file__).parent / "golden"


def hole_tensor(shape, *boxes):
    """A (1, 1, H, W) hole made of the rectangles (left, top, right, bottom)."""
    hole = torch.zeros(1, 1, *shape)
    for left, top, right, bottom in boxes:
        hole[..., top:bottom, left:right] = 1
    return hole


def big_photo(width=2400, height=1800):
    """A smooth synthetic photo: the content does not matter, its pixels must survive untouched."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8))


def mask_of(size, *boxes):
    mask = Image.new("L", size)
    for box in boxes:
        mask.paste(255, box)
    return mask


@pytest.mark.parametrize("boxes, margin, expected", [
    # a 100x60 hole: a 512 square centred on it, at the model's scale already
    ([(1500, 900, 1600, 960)], 128, region.Box(1294, 674, 512, 512)),
    # a 400x300 hole: side 400 * 512 / (512 - 256) = 800, scaled 0.64
    ([(1000, 700, 1400, 1000)], 128, region.Box(800, 450, 800, 800)),
    # by the image's corner: shifted inside
    ([(10, 20, 60, 40)], 128, region.Box(0, 0, 512, 512)),
    # two far-apart holes: one crop over both, clipped to the image's height
    ([(100, 100, 110, 400), (2200, 1500, 2210, 1700)], 64, region.Box(0, 0, 2400, 1800)),
])
def test_the_crop_box_is_where_the_rule_says(boxes, margin, expected):
    assert region.crop_box(hole_tensor((1800, 2400), *boxes), margin) == expected


def test_the_crop_keeps_the_margin_at_the_models_scale():
    box = region.crop_box(hole_tensor((1800, 2400), (1000, 700, 1400, 1000)), 128)
    assert str(box) == "region 800x800 at (800, 450), scaled 0.64x"
    assert (1000 - box.left) * box.scale >= 128 and (box.left + box.width - 1400) * box.scale >= 128


def test_a_big_photo_changes_only_the_hole_and_its_feathered_edge(tiny):
    photo, hole = big_photo(), (1500, 900, 1600, 960)
    result = np.asarray(inpaint(photo, mask_of(photo.size, hole), tiny, Options(steps=2)), np.int16)
    photo = np.asarray(photo, np.int16)
    assert result.shape == photo.shape
    changed = np.abs(result - photo).max(-1) > 0
    feather = region.FEATHER  # the crop is at the model's scale: the edge is FEATHER pixels wide
    edge = np.zeros_like(changed)
    edge[900 - feather:960 + feather, 1500 - feather:1600 + feather] = True
    assert not (changed & ~edge).any()  # every pixel farther out, in the crop or not, is the input's
    assert changed[900:960, 1500:1600].mean() > 0.9


def test_far_apart_holes_are_all_painted(tiny):
    photo = big_photo(1200, 900)
    holes = [(40, 60, 80, 100), (1100, 800, 1150, 850)]
    result = np.asarray(inpaint(photo, mask_of(photo.size, *holes), tiny, Options(steps=2)), np.int16)
    photo = np.asarray(photo, np.int16)
    for left, top, right, bottom in holes:
        assert (np.abs(result - photo).max(-1)[top:bottom, left:right] > 0).mean() > 0.9


def test_a_thin_stroke_still_warns_at_the_crops_scale(tiny):
    photo = big_photo(1600, 1200)
    mask = mask_of(photo.size, (110, 100, 111, 1100))  # 1 pixel wide; the crop, scaled 0.32, puts it at x = 35
    with pytest.warns(UserWarning, match="fall between the 8-pixel latent grid"):
        inpaint(photo, mask, tiny, Options(steps=1))


def test_at_the_size_limit_auto_and_full_are_the_same(tiny):
    side = region.FULL_UP_TO
    photo = Image.open(GOLDEN / "astronaut128.png").convert("RGB").resize((side, side // 2))
    mask = mask_of(photo.size, (300, 100, 340, 140))
    auto, full = (np.asarray(inpaint(photo, mask, tiny, Options(steps=1, region=rule))) for rule in ("auto", "full"))
    assert np.array_equal(auto, full)


@pytest.mark.parametrize("bad, message", [({"region": "crop"}, "region must be auto or full"),
                                          ({"region_margin": 256}, "region margin must be between 0 and 255"),
                                          ({"region_margin": -1}, "region margin must be between 0 and 255")])
def test_bad_region_options_are_refused(bad, message):
    with pytest.raises(InputError, match=message):
        Options(**bad)


def test_full_region_of_a_big_photo_is_the_whole_image():
    assert region.box_for(hole_tensor((1800, 2400), (0, 0, 10, 10)), Options(region="full")) is None
