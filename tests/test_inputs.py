"""Awkward but valid pictures, a fuzz test of the input loader, and the checks of the options."""
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm_min import DdnmOptions, InputError, NonFiniteError, Options, images, inpaint

GOLDEN = Path(__file__).parent / "golden"

HOLE = np.zeros((24, 40), bool)
HOLE[8:16, 8:24] = True


def saved(image, name, tmp_path, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return images.open_image(path)


def hole_of(hole):
    """The (1, 1, H, W) hole tensor of images.prepare as an (H, W) boolean array."""
    return hole[0, 0].numpy() == 1


def grey_levels(x):
    """The (1, 3, H, W) image tensor of images.prepare back in 0..255, (H, W, 3)."""
    return ((x[0] + 1) * 127.5).round().permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    image = rgb.convert("L").convert(mode) if mode in ("I;16", "LA", "1") else rgb.convert(mode)
    ext = "tiff" if mode == "CMYK" else "png"
    mask = Image.fromarray(HOLE.astype(np.uint8) * 255)
    x, hole = images.prepare(saved(image, f"x.{ext}", tmp_path), mask)
    assert x.shape == (1, 3, 24, 40) and np.array_equal(hole_of(hole), HOLE)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey16 = Image.fromarray(np.full((24, 40), 32896, np.uint16))  # 32896 / 257 = 128
    x, _ = images.prepare(saved(grey16, "g.png", tmp_path), Image.fromarray(HOLE.astype(np.uint8) * 255))
    assert grey_levels(x)[0, 0].tolist() == [128, 128, 128]


def test_a_float_image_is_read_at_its_0_to_1_scale_not_clipped_black(tmp_path):
    values = np.linspace(0, 1, 24 * 40, dtype=np.float32).reshape(24, 40)  # what scientific and HDR tools write
    mask = Image.fromarray(HOLE.astype(np.uint8) * 255)
    x, _ = images.prepare(saved(Image.fromarray(values, "F"), "f.tiff", tmp_path), mask)
    assert np.array_equal(grey_levels(x)[..., 0], (values.astype(np.float64) * 255).round())


def test_a_float_mask_marks_its_hole_from_one_half(tmp_path):
    mask = Image.fromarray(np.where(HOLE, 0.5, 0.498).astype(np.float32), "F")
    _, hole = images.prepare(Image.new("RGB", (40, 24)), saved(mask, "m.tiff", tmp_path))
    assert np.array_equal(hole_of(hole), HOLE)


@pytest.mark.parametrize("value, what", [(2.0, "image"), (-0.5, "image"), (np.nan, "mask"), (np.inf, "mask")])
def test_a_float_picture_outside_0_to_1_is_refused_in_one_line(value, what):
    values = np.full((24, 40), 0.5, np.float32)
    values[3, 5] = value
    pictures = {"image": Image.fromarray(values, "F"), "mask": Image.fromarray(HOLE.astype(np.uint8) * 255)}
    if what == "mask":
        pictures = {"image": Image.new("RGB", (40, 24)), "mask": Image.fromarray(values, "F")}
    with pytest.raises(InputError, match=rf"^{what}: a 32-bit float picture must hold values from 0 to 1, "
                                         rf"this one holds {value:g}: scale it") as error:
        images.prepare(pictures["image"], pictures["mask"])
    assert "\n" not in str(error.value)


def test_lab_and_premultiplied_pictures_read_as_their_rgb(tmp_path):
    """Pillow converts LAB (TIFF) only to RGB, and La only to LA: the other conversion fails there."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    lab, mask = rgb.convert("LAB"), Image.fromarray(HOLE.astype(np.uint8) * 255)
    x, hole = images.prepare(lab, saved(mask.convert("RGB").convert("LAB"), "m.tiff", tmp_path))
    assert np.array_equal(grey_levels(x), np.asarray(lab.convert("RGB"))) and np.array_equal(hole_of(hole), HOLE)
    la = rgb.convert("LA").convert("La")
    x, hole = images.prepare(la, mask.convert("LA").convert("La"))
    assert np.array_equal(grey_levels(x)[..., 0], np.asarray(la.convert("LA"))[..., 0])
    assert np.array_equal(hole_of(hole), HOLE)


def test_antialiased_mask_is_binarised_at_128():
    values = np.where(HOLE, 128, 127).astype(np.uint8)
    _, hole = images.prepare(Image.new("RGB", (40, 24)), Image.fromarray(values))
    assert np.array_equal(hole_of(hole), HOLE)


def test_transparent_mask_pixels_are_known():
    rgba = np.zeros((24, 40, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere ...
    rgba[..., 3] = np.where(HOLE, 255, 0)  # ... but opaque only in the hole
    _, hole = images.prepare(Image.new("RGB", (40, 24)), Image.fromarray(rgba, "RGBA"))
    assert np.array_equal(hole_of(hole), HOLE)


def test_exif_rotation_turns_image_and_mask_alike(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[HOLE] = 255  # the image is white exactly where the mask marks the hole
    image = saved(Image.fromarray(pixels), "i.png", tmp_path, exif=exif)
    mask = saved(Image.fromarray(HOLE.astype(np.uint8) * 255), "m.png", tmp_path, exif=exif)
    x, hole = images.prepare(image, mask)
    assert x.shape[-2:] == hole.shape[-2:] == (40, 24)  # upright: portrait
    assert np.array_equal(grey_levels(x)[..., 0] == 255, hole_of(hole))


def test_long_prompt_is_truncated_with_a_warning(tiny):
    with pytest.warns(UserWarning, match="longer than 77 tokens"):
        long, longer = tiny.encode_text("a cat " * 60), tiny.encode_text("a cat " * 60 + "and a dog")
    assert torch.equal(long, longer)


@pytest.mark.parametrize("dtype, advice", [
    ("float32", "the model itself gave non-finite values: corrupt weights, or an extreme guidance?"),
    ("bfloat16", "run again with --dtype float32"),
    ("float16", "float16 overflowed: run again with --dtype bfloat16 or float32")])
def test_non_finite_sampling_stops_with_advice_for_its_dtype(nan_weights, device, dtype, advice):
    if device == "cpu" and dtype == "float16":
        pytest.skip("float16 is refused on the CPU")
    from weights import load_models

    with pytest.raises(NonFiniteError) as error:
        inpaint(Image.open(GOLDEN / "astronaut128.png"), Image.open(GOLDEN / "astronaut128_mask.png"),
                load_models(nan_weights, device, dtype), Options(steps=1))
    assert str(error.value) == f"sampling produced inf/NaN in {dtype}: {advice}"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_an_image_or_an_input_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x"
    path.write_bytes(data)
    try:
        assert isinstance(images.open_image(path), Image.Image)
    except InputError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20), st.integers(1, 20),
       st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "1"]), st.sampled_from(["L", "RGBA", "1", "P"]),
       st.integers(0, 2**32 - 1), st.booleans())
def test_random_small_pictures_prepare_or_raise_input_error(w, h, mw, mh, mode, mask_mode, seed, invert):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert(mode)
    mask = Image.fromarray(rng.integers(0, 256, (mh, mw), dtype=np.uint8)).convert(mask_mode)
    try:
        x, hole = images.prepare(image, mask, invert)
    except InputError:
        return
    assert x.shape[:2] == (1, 3) and x.shape[-2:] == hole.shape[-2:] and min(x.shape[-2:]) >= 8
    assert hole_of(hole).any() and set(hole.unique().tolist()) <= {0.0, 1.0}
    x8, hole8 = images.pad_to_8(x, hole)
    assert x8.shape[-1] % 8 == 0 and x8.shape[-2] % 8 == 0 and x8.abs().max() <= 1
    for rule in ("nearest", "cover"):
        assert images.latent_known_mask(hole8, 2, rule).shape[-2:] == (x8.shape[-2] // 8, x8.shape[-1] // 8)


@pytest.mark.parametrize("bad, message", [({"steps": 0}, "steps must be between 1 and 1000"),
                                          ({"steps": 1001}, "steps must be between 1 and 1000"),
                                          ({"eta": -0.1}, "eta must be between 0 and 1, got -0.1"),
                                          ({"eta": 1.5}, "eta must be between 0 and 1, got 1.5"),
                                          ({"eta": float("inf")}, "eta must be a finite number, got inf"),
                                          ({"eta": float("nan")}, "eta must be a finite number, got nan"),
                                          ({"guidance": float("nan")}, "guidance must be a finite number, got nan"),
                                          ({"guidance": float("-inf")}, "guidance must be a finite number, got -inf"),
                                          ({"dilate": -1}, "mask dilation must be >= 0"),
                                          ({"feather": -2}, "feather must be >= 0"),
                                          ({"seed": 2**64}, f"seed must be a whole number from 0 to {2**64 - 1}, got"),
                                          ({"seed": -1}, f"seed must be a whole number from 0 to {2**64 - 1}, got -1")])
def test_out_of_range_options_are_refused_when_made(bad, message):
    with pytest.raises(InputError, match=message):
        Options(**bad)


@pytest.mark.parametrize("bad, message", [({"seed": 2**64}, "seed must be a whole number from 0 to"),
                                          ({"travel_repeat": 11}, "travel repeat must be between 1 and 10, got 11"),
                                          ({"travel_length": 0}, "travel length must be at least 1, got 0")])
def test_out_of_range_ddnm_options_are_refused_when_made(bad, message):
    with pytest.raises(InputError, match=message):
        DdnmOptions(**bad)


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1])
def test_every_seed_the_generator_takes_is_accepted_and_its_own(seed):
    assert Options(seed=seed).seed == DdnmOptions(seed=seed).seed == torch.Generator().manual_seed(seed).initial_seed()


def test_a_dilation_past_the_latent_makes_it_all_hole_as_its_longest_side_does():
    hole = torch.zeros(1, 1, 24, 40)
    hole[..., 8, 8] = 1
    widest = images.latent_known_mask(hole, 5, "nearest")  # 5 latent pixels: the longest side
    assert not widest.any() and torch.equal(images.latent_known_mask(hole, 10**20, "nearest"), widest)


def test_a_feather_past_the_image_is_computed_as_the_image_allows():
    result, x, hole = torch.ones(1, 3, 24, 40), -torch.ones(1, 3, 24, 40), torch.zeros(1, 1, 24, 40)
    hole[..., 0, 0] = 1
    blend = images.paste_back(result, x, hole, 10**20)  # each known pixel's weight: 1 - d / (10^20 + 1), 1 in float32
    assert torch.equal(blend, result)


@pytest.mark.parametrize("name, value", [("eta", 0), ("eta", 1), ("guidance", -3.0), ("guidance", 1e39)])
def test_eta_from_0_to_1_and_any_finite_guidance_are_accepted(name, value):
    assert getattr(Options(**{name: value}), name) == value


def test_invert_mask_is_applied_once(tiny):
    image, mask = Image.open(GOLDEN / "astronaut128.png"), Image.open(GOLDEN / "astronaut128_mask.png").convert("L")
    inverted = Image.fromarray(255 - np.asarray(mask))
    results = [inpaint(image, m, tiny, Options(steps=2, invert_mask=invert)) for m, invert in
               ((mask, False), (inverted, True))]
    assert np.array_equal(*map(np.asarray, results))
