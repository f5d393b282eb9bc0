"""benchmarks/table1.py --protocol authors on the tiny checkpoint: Table 1 as the authors' code
(Yus314/SD_uv-nix) ran it. Their squash, holes and latent squares to the pixel, the known pixels of a
result exactly the squashed photo's, a result against a restatement of their process.py and
sampler.py, and each image's place in their noise stream under --batch, torchrun and resuming."""
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_table1 import files, one_line_error, one_thread  # noqa: F401 (a fixture)
from test_table1_ddnm import ROOT, TINY, harness, table1

STEPS = 1  # one UNet call (a batch of 2) an image: the tiny UNet at 512 px is slow on one thread
ARGS = ["--protocol", "authors", "--weights", str(TINY), "--steps", str(STEPS), "--masks", "136", "--device", "cpu",
        "--quiet", "--no-fid"]
ORDER = ["b.jpg", "a.png"]  # the list's order, not sorted: b is image 0, the first in the noise stream


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two photos that are not square; b.jpg carries an EXIF orientation (6: turn it to view), which
    their Image.open ignores. And the list naming them in ORDER."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(2)
    for name, (w, h) in {"a.png": (600, 520), "b.jpg": (520, 700)}.items():
        photo = Image.fromarray(rng.integers(0, 256, (h // 20, w // 20, 3), dtype=np.uint8)).resize((w, h))
        exif = Image.Exif()
        exif[0x0112] = 6 if name == "b.jpg" else 1
        photo.save(folder / name, quality=95, exif=exif)
    (folder / "list.txt").write_text("\n".join(ORDER) + "\n")
    return folder


def run(data, out, *extra):
    try:
        table1.run(["--data", str(data), "--list", str(data / "list.txt"), "--out", str(out), *ARGS, *map(str, extra)])
    except SystemExit as e:
        pytest.fail(f"harness exited {e.code}")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory, one_thread):  # noqa: F811
    """One single-process run on one thread (as each torchrun process): 2 images, the 136 hole."""
    out = tmp_path_factory.mktemp("authors") / "out"
    run(data, out)
    return out


def squashed(path):
    """Their util.py load_image, word for word."""
    return np.asarray(Image.open(path).convert("RGB").resize((512, 512)))


def test_crops_are_their_squash_of_the_photo_as_stored_in_the_lists_order(data, reference):
    assert sorted(p.name for p in (reference / "crops").iterdir()) == ["0000_b.png", "0001_a.png"]
    for n, name in enumerate(ORDER):
        crop = np.asarray(Image.open(reference / "crops" / f"{n:04d}_{name[0]}.png"))
        assert np.array_equal(crop, squashed(data / name)), name


@pytest.mark.parametrize("side, start, stop", [(136, 188, 323), (168, 172, 339)])  # config.py get_mask_range
def test_their_holes_are_one_pixel_short_to_the_pixel(reference, side, start, stop):
    expected = np.zeros((512, 512), np.uint8)
    expected[start:stop, start:stop] = 255
    assert np.array_equal(np.asarray(table1.hole_mask(side, "authors")), expected)
    if side == 136:
        assert np.array_equal(np.asarray(Image.open(reference / "masks" / "authors_hole136.png")), expected)


@pytest.mark.parametrize("side, low, high", [(136, 23, 41), (168, 20, 44)])  # config.py latent_mask_min, _max
def test_latent_squares_black_hole_and_scale_reach_sample(tiny_cpu, monkeypatch, side, low, high):
    """What authors_inpaint hands `sample()`: M_l their square, E(y) 0.1825 times the posterior mean
    of the crop with its hole black; and what it makes of x_0 (here all 0: grey 128 in the hole)."""
    seen = {}

    def fake_sample(eps_theta, Ey, M_l, D, schedule, **kwargs):
        seen.update(Ey=Ey, M_l=M_l)
        return torch.zeros(1, 3, 512, 512)

    monkeypatch.setattr(table1, "sample", fake_sample)
    crop = np.random.default_rng(3).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    [result] = table1.authors_inpaint([crop], [side], [torch.Generator()], tiny_cpu, STEPS)
    expected = torch.ones(1, 1, 64, 64)
    expected[..., low:high, low:high] = 0
    assert torch.equal(seen["M_l"], expected)
    rows = table1.hole_rows(side, "authors")
    black = crop.copy()
    black[rows, rows] = 0
    y = torch.from_numpy(black).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    mean = tiny_cpu.vae.encode(y) / tiny_cpu.vae.scaling_factor
    assert torch.allclose(seen["Ey"], 0.1825 * mean, rtol=1e-5, atol=1e-6)
    outside = np.ones((512, 512), bool)
    outside[rows, rows] = False
    assert np.array_equal(result[outside], crop[outside]) and (result[rows, rows] == 128).all()


def test_known_pixels_of_a_result_are_the_squashed_photos_exactly(data, reference):
    rows = table1.hole_rows(136, "authors")
    for n, name in enumerate(ORDER):
        result = np.asarray(Image.open(reference / "inpainted" / "hole136" / f"{n:04d}_{name[0]}.png"))
        photo = squashed(data / name)
        outside = np.ones((512, 512), bool)
        outside[rows, rows] = False
        assert np.array_equal(result[outside], photo[outside]), name
        assert not np.array_equal(result[rows, rows], photo[rows, rows])  # the hole is painted


@torch.no_grad()
def their_code(models, photos, side, seed):
    """process.py and sampler.py restated on ldm_min's models, in their order and arithmetic: the
    last photo's result. torch.manual_seed once; each earlier photo draws what it drew there."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(len(photos) - 1):  # z_T, then one variance noise a step
        for _ in range(1 + STEPS):
            torch.randn((1, 4, 64, 64), generator=generator)
    stt, end = 256 - side // 2, 256 + side // 2 - 1                      # config.py get_mask_range
    low, high = {136: (23, 41), 168: (20, 44)}[side]                       # config.py
    mask = torch.ones(1, 4, 64, 64)
    mask[:, :, low:high, low:high] = 0                                     # inpainting.py create_mask
    masked = np.array(Image.open(photos[-1]).convert("RGB").resize((512, 512)))
    masked[stt:end, stt:end, :] = 0                                        # make_masked_dataset.py
    y = torch.from_numpy(masked).permute(2, 0, 1).float() / 255            # util.py load_image
    y[:, stt:end, stt:end] = 0
    latents_y = 0.1825 * models.vae.encode(2 * y[None] - 1) / models.vae.scaling_factor  # the posterior mean
    empty = models.encode_text("")
    text_embeddings = torch.cat([empty, empty])                            # util.py gen_text_embeddings
    latents = torch.randn((1, 4, 64, 64), generator=generator)
    ratio, abar = 1000 // STEPS, models.schedule.abar
    for t in [i * ratio + 1 for i in reversed(range(STEPS))]:              # DDIM "leading", steps_offset 1
        noise_pred = models.unet(torch.cat([latents] * 2), torch.tensor(t), text_embeddings)
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + 7.5 * (noise_pred_text - noise_pred_uncond)
        prev_timestep = t - ratio
        alpha_prod_t = abar[t]
        alpha_prod_t_prev = abar[prev_timestep] if prev_timestep >= 0 else abar[0]
        pred_original_sample = (latents - (1 - alpha_prod_t) ** 0.5 * noise_pred) / alpha_prod_t ** 0.5
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = 0.85 * variance ** 0.5
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * noise_pred
        pred_original_sample = pred_original_sample - mask * (mask * pred_original_sample - latents_y)
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
        latents = prev_sample + std_dev_t * torch.randn(noise_pred.shape, generator=generator)
    image = models.vae.decode(1 / 0.18215 * latents * models.vae.scaling_factor)  # decode() divides by the factor
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    images = (image * 255).round().astype("uint8")
    masked[stt:end, stt:end, :] = images[0, stt:end, stt:end, :]           # process.py: the hole pasted back
    return masked


def test_a_result_is_their_codes_within_two_grey_levels(data, reference, tiny_cpu):
    """Image 1, the second in the stream: its noise continues image 0's."""
    theirs = their_code(tiny_cpu, [data / name for name in ORDER], 136, seed=0).astype(np.int16)
    ours = np.asarray(Image.open(reference / "inpainted" / "hole136" / "0001_a.png"), np.int16)
    assert np.abs(ours - theirs).max() <= 2


def test_the_stream_at_image_n_is_n_images_of_draws_on_from_the_seed():
    per_image = (1 + STEPS) * 4 * 64 * 64
    stream = table1.NoiseStream(18, per_image)
    at = {n: stream.at(n) for n in (2, 3, 1)}  # out of order: walks back to the start for 1
    generator = torch.Generator().manual_seed(18)
    for n in range(4):
        first = torch.randn((1, 4, 64, 64), generator=generator)  # image n's z_T
        if n in at:
            assert torch.equal(torch.randn((1, 4, 64, 64), generator=at[n]), first), n
        for _ in range(STEPS):
            torch.randn((1, 4, 64, 64), generator=generator)


def test_a_batch_of_two_gives_each_image_its_draws(data, reference, tmp_path, one_thread):  # noqa: F811
    out = tmp_path / "out"
    run(data, out, "--batch", 2)
    batched, single = files(out), files(reference)
    assert sorted(batched) == sorted(single)
    for name in single:  # a batch sums in another order: 1 grey level; other draws would change the hole whole
        a, b = (np.asarray(Image.open(io.BytesIO(f[name])), np.int16) for f in (batched, single))
        assert np.abs(a - b).max() <= (1 if name.startswith("inpainted") else 0), name


def test_two_gloo_processes_write_the_single_runs_bytes(data, reference, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(ROOT / "benchmarks" / "table1.py"), "--data", str(data), "--list",
                              str(data / "list.txt"), "--out", str(out), *ARGS], capture_output=True, text=True,
                             env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert files(out) == files(reference)  # rank 1 inpaints image 1 alone: it walks the stream to it


def test_a_resumed_run_gives_the_last_image_its_draws(data, reference, tmp_path, one_thread):  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "inpainted" / "hole136" / "0001_a.png").unlink()
    run(data, out)
    assert files(out) == files(reference)


@pytest.mark.parametrize("extra, says", [(["--masks", "136,100"], "holes of 136 and 168 only"),
                                         (["--method", "blend"], "--method blend means nothing"),
                                         (["--prompts", "original"], "--prompts means nothing")])
def test_what_their_code_has_no_rule_for_is_refused_in_one_line(capsys, data, tmp_path, extra, says):
    status, _, err = harness(capsys, data, tmp_path / "out", *ARGS, *extra)
    assert one_line_error(status, err) and says in err, err
    assert not (tmp_path / "out").exists()


def test_an_out_of_the_other_protocol_is_refused(capsys, data, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    paper = [a for a in ARGS if a not in ("--protocol", "authors")]
    status, _, err = harness(capsys, data, out, "--list", data / "list.txt", *paper)
    assert one_line_error(status, err) and "protocol 'authors'" in err, err


def test_ddnm_under_their_protocol_paints_the_squashed_photo_in_the_forks_centred_hole(data, tmp_path, tiny_adm):
    """Their DDNM fork reads the 512x512 image as given (the squashed crop here) and masks the centred
    168 square at 172 (center_mask_512x512.png): its known pixels are the squashed photo's exactly."""
    out = tmp_path / "out"
    table1.run(["--data", str(data), "--list", str(data / "list.txt"), "--out", str(out), "--protocol", "authors",
                "--method", "ddnm", "--adm-weights", str(tiny_adm), "--steps", "1", "--masks", "168", "--limit", "1",
                "--device", "cpu", "--quiet", "--no-fid"])
    centred = np.zeros((512, 512), bool)
    centred[172:340, 172:340] = True
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "hole168.png")) > 0, centred)
    photo = squashed(data / ORDER[0])
    assert np.array_equal(np.asarray(Image.open(out / "crops" / "0000_b.png")), photo)
    result = np.asarray(Image.open(out / "inpainted" / "ddnm" / "hole168" / "0000_b.png"))
    assert np.array_equal(result[~centred], photo[~centred]) and not np.array_equal(result[centred], photo[centred])
