"""The DDIM schedule against closed forms, and Algorithm 1 against denoisers known exactly."""
import math
from types import SimpleNamespace

import pytest
import torch

from ldm_min import InputError, sample
from ldm_min.models import read_configs
from ldm_min.schedule import Schedule

SCHEDULE = Schedule(read_configs()["scheduler"])


def beta(k):
    """"scaled_linear" beta_k, k = 0 .. 999, in float64."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    return (lo + k * (hi - lo) / 999) ** 2


def test_thirty_timesteps_are_958_925_down_to_1():
    assert SCHEDULE.timesteps(30) == list(range(958, 0, -33))


def test_every_timestep_stays_in_the_trained_range():
    assert SCHEDULE.timesteps(1000) == list(range(999, -1, -1))
    assert max(SCHEDULE.timesteps(999)) == 999 and min(SCHEDULE.timesteps(999)) == 1


def test_abar_at_t1_is_the_product_of_the_first_two_alphas():
    assert SCHEDULE.abar[1].item() == pytest.approx((1 - beta(0)) * (1 - beta(1)), rel=1e-6)


def test_last_step_uses_abar_0_as_abar_prev():
    assert SCHEDULE.abar_prev(1, 30).item() == pytest.approx(1 - beta(0), rel=1e-7)
    assert SCHEDULE.abar_prev(34, 30) is not SCHEDULE.abar_final


def test_sigma_at_eta_1_with_1000_steps_is_the_ddpm_posterior_std():
    t = 500
    abar_t, abar_prev = SCHEDULE.abar[t], SCHEDULE.abar_prev(t, 1000)
    ddpm = math.sqrt(beta(t) * (1 - abar_prev.item()) / (1 - abar_t.item()))
    assert Schedule.sigma(1.0, abar_t, abar_prev).item() == pytest.approx(ddpm, rel=1e-4)


def test_sigma_at_eta_0_is_zero():
    assert Schedule.sigma(0.0, SCHEDULE.abar[958], SCHEDULE.abar[925]).item() == 0


def point_mass_models(points, shape):
    """Fake models whose eps_theta is the exact noise predictor for data uniform over `points`:
    E[z_0 | z_t] is a softmax-weighted mean of the points; eps = (z_t - sqrt(abar) E[z_0|z_t]) / sqrt(1-abar).
    The decoder is the identity, so sample() returns z_0."""
    points = torch.stack(points)

    def unet(z, t, context):
        abar = SCHEDULE.abar[t].double()
        z = z.double()
        d2 = ((z - abar.sqrt() * points) ** 2).flatten(1).sum(1)  # squared distance to each noised point
        w = torch.softmax(-d2 / (2 * (1 - abar)), dim=0)
        mean = (w[:, None, None, None] * points).sum(0, keepdim=True)
        return ((z - abar.sqrt() * mean) / (1 - abar).sqrt()).float()

    return SimpleNamespace(unet=unet, schedule=SCHEDULE, dtype=torch.float32, device=torch.device("cpu"),
                           encode_text=lambda prompt: torch.zeros(1, 77, 8), vae=SimpleNamespace(decode=lambda z: z))


def test_eq1_then_eq3_recovers_z0_when_eps_is_the_true_noise():
    a = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    models = point_mass_models([a[0]], a.shape)
    z0s = []
    sample(models, a, torch.zeros_like(a), steps=10, eta=0.85, callback=lambda i, t, z, z0, z0_hat: z0s.append(z0))
    for z0 in z0s:
        assert torch.allclose(z0, a, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.85])
def test_projection_picks_the_data_point_that_matches_the_known_region(eta):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g)
    b[..., :4] = a[..., :4] + 3  # the points differ in the known left half and in the right half
    M_l = torch.zeros(1, 1, 8, 8)
    M_l[..., :4] = 1  # the left half is known, and equals a's
    models = point_mass_models([a, b], a.shape)
    for seed in range(4):  # whatever the noise, the projection steers every run to a
        z0 = sample(models, a[None], M_l, steps=30, eta=eta, seed=seed)[0]
        # z_0 = sqrt(abar_0) zhat_0 + ..: the last step leaves noise of scale sqrt(1 - abar_0) = 0.03.
        hole = (z0 - a)[..., 4:], (z0 - b)[..., 4:]
        assert hole[0].abs().max() < 0.2 and hole[1].abs().mean() > 0.5


def test_eta_0_draws_only_z_T_and_eta_above_0_one_noise_per_step(monkeypatch):
    draws = []
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(a) or randn(*a, **k))
    models = point_mass_models([torch.zeros(4, 2, 2)], (1, 4, 2, 2))
    sample(models, torch.zeros(1, 4, 2, 2), torch.ones(1, 1, 2, 2), steps=5, eta=0.0)
    assert len(draws) == 1
    sample(models, torch.zeros(1, 4, 2, 2), torch.ones(1, 1, 2, 2), steps=5, eta=0.5)
    assert len(draws) == 1 + 6


def test_eta_0_gives_the_same_result_twice():
    models = point_mass_models([torch.ones(4, 4, 4), -torch.ones(4, 4, 4)], None)
    runs = [sample(models, torch.ones(1, 4, 4, 4), torch.zeros(1, 1, 4, 4), steps=8, eta=0.0) for _ in range(2)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("steps, eta", [(0, 0.85), (1001, 0.85), (30, -0.1)])
def test_out_of_range_steps_or_eta_are_refused(steps, eta):
    models = point_mass_models([torch.zeros(4, 2, 2)], None)
    with pytest.raises(InputError, match="steps|eta"):
        sample(models, torch.zeros(1, 4, 2, 2), torch.ones(1, 1, 2, 2), steps=steps, eta=eta)


class Recorder:
    """Wraps the UNet and records the context of every call."""

    def __init__(self, unet):
        self.unet, self.contexts = unet, []

    def __call__(self, z, t, context):
        self.contexts.append(context)
        return self.unet(z, t, context)

    def __getattr__(self, name):
        return getattr(self.unet, name)


@pytest.mark.parametrize("prompt, guidance, batch", [("", 7.5, [""]), ("a cat", 7.5, ["", "a cat"]),
                                                     ("a cat", 1.0, ["a cat"])])
def test_unet_passes_per_step_follow_the_prompt_and_guidance(tiny, monkeypatch, prompt, guidance, batch):
    recorder = Recorder(tiny.unet)
    monkeypatch.setattr(tiny, "unet", recorder)
    Ey = torch.zeros(1, 4, 4, 4)
    sample(tiny, Ey, torch.ones_like(Ey), prompt=prompt, guidance=guidance, steps=3)
    expected = torch.cat([tiny.encode_text(text) for text in batch])
    assert len(recorder.contexts) == 3
    assert all(torch.equal(context, expected) for context in recorder.contexts)


def test_a_compiled_unet_is_compiled_once_for_all_timesteps(tiny, monkeypatch):
    graphs = []

    def backend(graph, example_inputs):  # a torch.compile backend that only counts what it is given
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    monkeypatch.setattr(tiny, "unet", torch.compile(tiny.unet, backend=backend))
    Ey = torch.zeros(1, 4, 4, 4)
    sample(tiny, Ey, torch.ones_like(Ey), steps=3)
    assert len(graphs) == 1
