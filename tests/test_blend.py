"""blend(): Algorithm 1's loop with the known latents of z_t blended in where eq. 5 projects z_{0|t},
against denoisers known exactly, and through inpaint() as Options(method="blend")."""
from pathlib import Path

import pytest
import torch

from ldm_min import InputError, Options, images, inpaint, sample
from ldm_min.blend import blend
from ldm_min.pipeline import eps_model, inpaint_tensors
from test_sample import SCHEDULE, point_mass_eps

GOLDEN = Path(__file__).parent / "golden"


def run(sampler, eps_theta, Ey, M_l, steps=6, eta=0.85, seed=0, callback=None):
    """A sampler with the identity as the decoder D, so it returns z_0."""
    return sampler(eps_theta, Ey, M_l, lambda z: z, SCHEDULE, T=steps, eta=eta, seed=seed, callback=callback)


@pytest.fixture
def half_known():
    """Two data points that differ everywhere, E(y) the first one's, its left half known."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g)
    M_l = torch.zeros(1, 1, 8, 8)
    M_l[..., :4] = 1
    return point_mass_eps([a, b + 3]), a[None], M_l


@pytest.mark.parametrize("eta", [0.0, 0.85])
def test_with_d_the_identity_the_known_latents_at_the_end_are_e_y_exactly(half_known, eta):
    eps_theta, Ey, M_l = half_known
    z0 = run(blend, eps_theta, Ey, M_l, eta=eta)
    assert torch.equal(M_l * z0, M_l * Ey)


def test_its_hole_differs_from_samples_for_the_same_seed(tiny_cpu):
    """The UNet sees the known latents around the hole: noisy ones (the blend) or eq. 5's, and paints it otherwise."""
    x, hole = images.prepare(images.open_image(GOLDEN / "astronaut128.png"),
                             images.open_image(GOLDEN / "astronaut128_mask.png"))
    paper, blended = (inpaint_tensors(x, hole, tiny_cpu, Options(method=m, steps=3)) for m in ("paper", "blend"))
    grey_levels = 127.5 * (blended - paper).abs()
    assert grey_levels[hole.expand_as(x) > 0].mean() > 1  # the same method twice: 0


def test_with_nothing_known_it_is_sample_exactly_the_same_loop_and_noise():
    """M_l = 0 leaves both projections nothing to do: the same z_T, eps_z and steps give the same z_0."""
    g = torch.Generator().manual_seed(1)
    Ey, nothing = torch.randn(1, 4, 6, 6, generator=g), torch.zeros(1, 1, 6, 6)
    eps_theta = point_mass_eps([torch.randn(4, 6, 6, generator=g), torch.randn(4, 6, 6, generator=g)])
    assert torch.equal(run(blend, eps_theta, Ey, nothing, seed=5), run(sample, eps_theta, Ey, nothing, seed=5))


@pytest.mark.parametrize("eta, count", [(0.0, 1 + 5), (0.5, 1 + 6 + 5)])
def test_it_draws_samples_noise_then_one_n_a_step_but_the_last_all_before_the_first_step(monkeypatch, eta, count):
    draws, seen = [], []
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(a) or randn(*a, **k))
    eps_theta = point_mass_eps([torch.zeros(4, 2, 2)])
    run(blend, lambda z, t: seen.append(len(draws)) or eps_theta(z, t), torch.zeros(1, 4, 2, 2),
        torch.ones(1, 1, 2, 2), steps=6, eta=eta)
    assert seen == [count] * 6


def test_the_seed_gives_the_same_picture_whatever_the_batch():
    """A denoiser that treats every latent pixel alone: a batch's samples are its images' single ones exactly."""
    g = torch.Generator().manual_seed(2)
    Ey, M_l = torch.randn(3, 4, 4, 4, generator=g), (torch.rand(3, 1, 4, 4, generator=g) > 0.5).float()
    eps_theta, seeds = lambda z, t: 0.5 * z, [3, 7, 11]
    batch = run(blend, eps_theta, Ey, M_l, seed=seeds)
    alone = [run(blend, eps_theta, Ey[k:k + 1], M_l[k:k + 1], seed=seed) for k, seed in enumerate(seeds)]
    assert torch.equal(batch, torch.cat(alone))


def test_the_callback_sees_each_step_with_the_blended_z_where_sample_passes_z0_hat(half_known):
    eps_theta, Ey, M_l = half_known
    seen = []
    z0 = run(blend, eps_theta, Ey, M_l, callback=lambda i, t, z, z_0t, projected: seen.append((i, z, projected)))
    assert [i for i, _, _ in seen] == list(range(6)) and all(z is projected for _, z, projected in seen)
    assert torch.equal(seen[-1][1], z0)


def test_inpaint_with_method_blend_runs_blend_on_its_inputs(tiny_cpu):
    image, mask = images.open_image(GOLDEN / "astronaut128.png"), images.open_image(GOLDEN / "astronaut128_mask.png")
    options, latents = Options(method="blend", steps=3, seed=4), []
    inpaint(image, mask, tiny_cpu, options, callback=lambda i, t, z, *_: latents.append(z))
    x, hole = images.prepare(image, mask)
    Ey = tiny_cpu.vae.encode(x * (1 - hole))
    M_l = images.latent_known_mask(hole, options.dilate, options.latent_mask)
    z0 = blend(eps_model(tiny_cpu, "", options.guidance), Ey, M_l, lambda z: z, tiny_cpu.schedule, T=3,
               eta=options.eta, seed=4)
    assert torch.equal(latents[-1], z0)


def test_a_method_that_is_not_paper_or_blend_is_refused():
    with pytest.raises(InputError, match="method must be paper or blend, got 'ddnm'"):
        Options(method="ddnm")
