"""The DDIM schedule against closed forms, and Algorithm 1 against denoisers known exactly."""
import math
from pathlib import Path

import pytest
import torch

from ldm_min import sample
from ldm_min.pipeline import eps_model
from ldm_min.schedule import Schedule
from weights import load_models, read_configs

TINY = Path(__file__).parent / "golden" / "tiny-sd"

SCHEDULE = Schedule(read_configs()["scheduler"])


def beta(k):
    """"scaled_linear" beta_k, k = 0 .. 999, in float64."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    return (lo + k * (hi - lo) / 999) ** 2


def test_thirty_timesteps_are_958_925_down_to_1_each_with_the_next_one():
    assert SCHEDULE.timesteps(30) == [(t, t - 33) for t in range(958, 0, -33)]


def test_every_timestep_stays_in_the_trained_range():
    assert [t for t, _ in SCHEDULE.timesteps(1000)] == list(range(999, -1, -1))
    timesteps = [t for t, _ in SCHEDULE.timesteps(999)]
    assert max(timesteps) == 999 and min(timesteps) == 1


def test_abar_at_t1_is_the_product_of_the_first_two_alphas():
    assert SCHEDULE.abar_at(1).item() == pytest.approx((1 - beta(0)) * (1 - beta(1)), rel=1e-6)


def test_last_step_uses_abar_0_as_abar_prev():
    (t2, t2_prev), (t, t_prev) = SCHEDULE.timesteps(30)[-2:]
    assert (t2, t2_prev, t) == (34, 1, 1) and t_prev < 0
    assert SCHEDULE.abar_at(t_prev).item() == pytest.approx(1 - beta(0), rel=1e-7)


def test_sigma_at_eta_1_with_1000_steps_is_the_ddpm_posterior_std():
    t = 500
    abar_t, abar_prev = SCHEDULE.abar_at(t), SCHEDULE.abar_at(t - 1)
    ddpm = math.sqrt(beta(t) * (1 - abar_prev.item()) / (1 - abar_t.item()))
    assert Schedule.sigma(1.0, abar_t, abar_prev).item() == pytest.approx(ddpm, rel=1e-4)


def test_sigma_at_eta_0_is_zero():
    assert Schedule.sigma(0.0, SCHEDULE.abar_at(958), SCHEDULE.abar_at(925)).item() == 0


def point_mass_eps(points):
    """The exact noise predictor eps_theta for data uniform over `points`: E[z_0 | z_t] is a
    softmax-weighted mean of the points; eps = (z_t - sqrt(abar) E[z_0|z_t]) / sqrt(1-abar)."""
    points = torch.stack(points)

    def eps_theta(z, t):
        abar = SCHEDULE.abar_at(t).double()
        z = z.double()
        d2 = ((z - abar.sqrt() * points) ** 2).flatten(1).sum(1)  # squared distance to each noised point
        w = torch.softmax(-d2 / (2 * (1 - abar)), dim=0)
        mean = (w[:, None, None, None] * points).sum(0, keepdim=True)
        return ((z - abar.sqrt() * mean) / (1 - abar).sqrt()).float()

    return eps_theta


def run(eps_theta, Ey, M_l, steps, eta, seed=0, callback=None):
    """sample() with the identity as the decoder D, so it returns z_0."""
    return sample(eps_theta, Ey, M_l, lambda z: z, SCHEDULE, T=steps, eta=eta, seed=seed, callback=callback)


def test_eq1_then_eq3_recovers_z0_when_eps_is_the_true_noise():
    a = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    z0s = []
    run(point_mass_eps([a[0]]), a, torch.zeros_like(a), steps=10, eta=0.85,
        callback=lambda i, t, z, z0, z0_hat: z0s.append(z0))
    for z0 in z0s:
        assert torch.allclose(z0, a, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.85])
def test_projection_picks_the_data_point_that_matches_the_known_region(eta):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g)
    b[..., :4] = a[..., :4] + 3  # the points differ in the known left half and in the right half
    M_l = torch.zeros(1, 1, 8, 8)
    M_l[..., :4] = 1  # the left half is known, and equals a's
    for seed in range(4):  # whatever the noise, the projection steers every run to a
        z0 = run(point_mass_eps([a, b]), a[None], M_l, steps=30, eta=eta, seed=seed)[0]
        # z_0 = sqrt(abar_0) zhat_0 + ..: the last step leaves noise of scale sqrt(1 - abar_0) = 0.03.
        hole = (z0 - a)[..., 4:], (z0 - b)[..., 4:]
        assert hole[0].abs().max() < 0.2 and hole[1].abs().mean() > 0.5


def test_eta_0_draws_only_z_T_and_eta_above_0_one_noise_per_step(monkeypatch):
    draws = []
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(a) or randn(*a, **k))
    eps_theta = point_mass_eps([torch.zeros(4, 2, 2)])
    run(eps_theta, torch.zeros(1, 4, 2, 2), torch.ones(1, 1, 2, 2), steps=5, eta=0.0)
    assert len(draws) == 1
    run(eps_theta, torch.zeros(1, 4, 2, 2), torch.ones(1, 1, 2, 2), steps=5, eta=0.5)
    assert len(draws) == 1 + 6


def test_all_noise_is_drawn_before_the_first_step(monkeypatch):
    draws, seen = [], []
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(a) or randn(*a, **k))
    eps_theta = point_mass_eps([torch.zeros(4, 2, 2)])
    run(lambda z, t: seen.append(len(draws)) or eps_theta(z, t), torch.zeros(1, 4, 2, 2), torch.ones(1, 1, 2, 2),
        steps=5, eta=0.5)
    assert seen == [1 + 5] * 5


def test_each_image_of_a_batch_draws_its_own_seeds_noise():
    """A denoiser that treats every latent pixel alone: a batch's samples are then its images'
    single samples exactly, so each image's z_T and every eps_z are its seed's draws, in order."""
    g = torch.Generator().manual_seed(2)
    Ey, M_l = torch.randn(3, 4, 4, 4, generator=g), (torch.rand(3, 1, 4, 4, generator=g) > 0.5).float()
    eps_theta, seeds = lambda z, t: 0.5 * z, [3, 7, 11]
    batch = run(eps_theta, Ey, M_l, steps=4, eta=0.85, seed=seeds)
    alone = [run(eps_theta, Ey[k:k + 1], M_l[k:k + 1], steps=4, eta=0.85, seed=seed) for k, seed in enumerate(seeds)]
    assert torch.equal(batch, torch.cat(alone))


def test_the_step_loop_never_waits_for_the_gpu(tiny, device):
    if device != "cuda":
        pytest.skip("needs a GPU: pytest --device cuda")
    Ey = torch.zeros(1, 4, 8, 8, device=device)
    strict = lambda i, *_: torch.cuda.set_sync_debug_mode("error")  # from the end of the first step on
    try:
        run(eps_model(tiny, "a cat", 7.5), Ey, torch.ones_like(Ey), steps=4, eta=0.85, callback=strict)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_eta_0_gives_the_same_result_twice():
    eps_theta = point_mass_eps([torch.ones(4, 4, 4), -torch.ones(4, 4, 4)])
    runs = [run(eps_theta, torch.ones(1, 4, 4, 4), torch.zeros(1, 1, 4, 4), steps=8, eta=0.0) for _ in range(2)]
    assert torch.equal(*runs)


class Recorder:
    """Wraps the UNet and records the context of every call."""

    def __init__(self, unet):
        self.unet, self.contexts = unet, []

    def __call__(self, z, t, context):
        self.contexts.append(context)
        return self.unet(z, t, context)


@pytest.mark.parametrize("prompt, guidance, batch", [("", 7.5, [""]), ("a cat", 7.5, ["", "a cat"]),
                                                     ("a cat", 1.0, ["a cat"])])
def test_unet_passes_per_step_follow_the_prompt_and_guidance(tiny, monkeypatch, prompt, guidance, batch):
    recorder = Recorder(tiny.unet)
    monkeypatch.setattr(tiny, "unet", recorder)
    Ey = torch.zeros(1, 4, 4, 4, device=tiny.device)
    run(eps_model(tiny, prompt, guidance), Ey, torch.ones_like(Ey), steps=3, eta=0.85)
    expected = torch.cat([tiny.encode_text(text) for text in batch])
    assert len(recorder.contexts) == 3
    assert all(torch.equal(context, expected) for context in recorder.contexts)


def test_guided_eps_is_eps_u_plus_g_times_eps_c_minus_eps_u(tiny, close_paths):
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(tiny.device)
    eps_u, eps_c = (eps_model(tiny, prompt, 1.0)(z, 500) for prompt in ("", "a cat"))
    # One batch-2 pass against two batch-1 passes: two code paths.
    assert close_paths(eps_model(tiny, "a cat", 7.5)(z, 500), eps_u + 7.5 * (eps_c - eps_u))


def test_guided_eps_of_a_batch_is_each_images_own_with_its_prompt(tiny, close_paths):
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(tiny.device)
    batch = eps_model(tiny, ["a cat", "a dog"], 7.5)(z, 500)
    alone = [eps_model(tiny, prompt, 7.5)(z[k:k + 1], 500) for k, prompt in enumerate(["a cat", "a dog"])]
    # Two code paths; a prompt or half out of place would be off by the size of eps itself.
    assert close_paths(batch, torch.cat(alone))


def test_a_compiled_unet_is_compiled_once_for_all_timesteps(device):
    graphs = []

    def backend(graph, example_inputs):  # a torch.compile backend that only counts what it is given
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    models = load_models(TINY, device, "float32", compile=True)  # a UNet made to be compiled
    models.unet = torch.compile(models.unet._orig_mod, backend=backend)
    Ey = torch.zeros(1, 4, 4, 4, device=models.device)
    run(eps_model(models, "", 7.5), Ey, torch.ones_like(Ey), steps=3, eta=0.85)
    assert len(graphs) == 1


def test_sample_py_holds_algorithm_1_alone_and_the_pipeline_its_own_file():
    """A learner opening the file of Algorithm 1 finds sample() and nothing else; inpaint() and the
    rest of the pipeline live in pipeline.py, and the package's public names still import."""
    import ast

    import ldm_min
    from ldm_min import pipeline

    tree = ast.parse((Path(ldm_min.__file__).parent / "sample.py").read_text(encoding="utf-8"))
    assert [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))] == ["sample"]
    assert ldm_min.sample.__module__ == "ldm_min.sample" and ldm_min.inpaint is pipeline.inpaint
    assert all(callable(getattr(pipeline, name)) for name in
               ("inpaint", "inpaint_tensors", "inpaint_batch", "prepare", "finish", "eps_model"))
