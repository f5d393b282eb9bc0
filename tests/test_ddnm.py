"""DDNM, the paper's baseline (ldm_min/ddnm.py): hq demo's schedule and time travel, the fork's
windows, the noise's order, and DDNM's exact consistency (the known pixels are the input's)."""
import pytest
import torch

from ldm_min import InputError, ddnm
from ldm_min.options import DdnmOptions


class StandIn(torch.nn.Module):
    """A small deterministic stand-in for the ADM UNet, called as it is: (B, 3, H, W) in [-1, 1]
    and B timesteps -> (B, 6, H, W). It records the timesteps of every call."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv.weight.data = torch.randn(self.conv.weight.shape, generator=g) * 0.2
        self.conv.bias.data = torch.randn(6, generator=g) * 0.1
        self.calls = []

    def forward(self, x, t):
        assert t.shape == (len(x),) and not t.is_floating_point()
        self.calls.append(t.tolist())
        return torch.tanh(self.conv(x)) + t[:, None, None, None] / 1000


def picture(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    return torch.round((x + 1) * 127.5) / 127.5 - 1  # what images.to_tensor makes of 8-bit pixels


def centred_hole(h, w, side):
    hole = torch.zeros(1, 1, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    hole[..., top:top + side, left:left + side] = 1
    return hole


def test_respacing_is_guided_diffusions_space_timesteps():
    """T steps spanning all 1000, the respaced betas and the DDPM posterior, against guided-diffusion."""
    respace = pytest.importorskip("guided_diffusion.respace")
    gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
    for T in (25, 100, 7, 1000):
        ours = ddnm.AdmSchedule(T)
        theirs = respace.SpacedDiffusion(use_timesteps=respace.space_timesteps(1000, str(T)),
                                         betas=gd.get_named_beta_schedule("linear", 1000),
                                         model_mean_type=gd.ModelMeanType.EPSILON,
                                         model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE)
        assert ours.timesteps == theirs.timestep_map
        for mine, their in ((ours.abar, theirs.alphas_cumprod), (ours.beta, theirs.betas),
                            (ours.coef_x0, theirs.posterior_mean_coef1), (ours.coef_xt, theirs.posterior_mean_coef2),
                            (ours.sigma ** 2, theirs.posterior_variance)):
            assert torch.allclose(mine, torch.from_numpy(their).float(), rtol=1e-6, atol=1e-9)
    assert ddnm.AdmSchedule(25).timesteps[:4] == [0, 42, 83, 125] and ddnm.AdmSchedule(25).timesteps[-1] == 999


def test_travel_walk_is_hq_demos_at_the_papers_settings():
    """T = 25, length 10, 3 samples: down to 10, back up to 20 twice; down to 0, back up to 10 twice."""
    down = lambda a, b: list(range(a, b - 1, -1))
    up = lambda a, b: list(range(a, b + 1))
    expected = (down(24, 10) + (up(11, 20) + down(19, 10)) * 2 + down(9, 0) + (up(1, 10) + down(9, 0)) * 2 + [-1])
    assert ddnm.travel(25, 10, 3) == expected


@pytest.mark.parametrize("T, length, repeat", [(25, 10, 3), (100, 10, 3), (25, 5, 2), (10, 10, 3), (37, 4, 1),
                                               (1, 10, 3)])
def test_unet_calls_per_window_match_the_formula(T, length, repeat):
    """T steps down, and (repeat - 1) extra walks down each of the stretches of `length` that start at
    0, length, 2 length, ... below T - length. The paper's settings: 25 + 2 * 2 * 10 = 65."""
    jumps = len(range(0, T - length, length))
    expected = T + (repeat - 1) * length * jumps
    model = StandIn()
    y, m = picture(256, 256), torch.ones(1, 1, 256, 256)
    m[..., 100:150, 100:150] = 0
    walk = ddnm.travel(T, length, repeat)
    noise = torch.randn(len(walk), 1, 3, 256, 256)
    ddnm.ddnm(ddnm.adm_eps(model), y * m, m, ddnm.AdmSchedule(T), walk, noise)
    assert len(model.calls) == ddnm.calls_per_window(walk) == expected
    assert (T, length, repeat) != (25, 10, 3) or expected == 65


def test_each_call_gets_the_respaced_timestep_of_its_step():
    model = StandIn()
    walk, schedule = ddnm.travel(25, 10, 3), ddnm.AdmSchedule(25)
    m = torch.ones(1, 1, 256, 256)
    m[..., :10, :10] = 0
    ddnm.ddnm(ddnm.adm_eps(model), picture(256, 256) * m, m, schedule, walk, torch.randn(len(walk), 1, 3, 256, 256))
    steps_down = [a for a, b in zip(walk, walk[1:]) if b < a]
    assert model.calls == [[schedule.timesteps[i]] for i in steps_down]
    assert model.calls[0] == [999] and model.calls[-1] == [0]


def test_windows_at_512_are_the_forks_nine_row_by_row():
    assert ddnm.windows(512, 512) == [(0, 0), (0, 128), (0, 256), (128, 0), (128, 128), (128, 256),
                                      (256, 0), (256, 128), (256, 256)]


def test_the_last_row_and_column_of_windows_are_flush_with_the_edge():
    assert ddnm.windows(256, 256) == [(0, 0)]
    assert ddnm.windows(300, 700) == [(top, left) for top in (0, 44) for left in (0, 128, 256, 384, 444)]


@pytest.mark.parametrize("side", [168, 136])
def test_a_centred_hole_at_512_samples_the_four_windows_that_still_hold_hole(side):
    """Table 1's holes: after windows (0, 0) and (0, 128), rows 0-255 of columns 0-383 are known, so
    (0, 256) has nothing left to paint; after (128, 0) and (128, 128) the whole hole is painted."""
    assert ddnm.plan(centred_hole(512, 512, side)) == [(0, 0), (0, 128), (128, 0), (128, 128)]


def test_a_window_with_no_hole_left_is_skipped_and_holes_anywhere_are_reached():
    hole = torch.zeros(1, 1, 512, 512)
    hole[..., 500, 5] = 1     # bottom-left corner: only windows of the last row hold it
    hole[..., 3, 300] = 1     # top right
    assert ddnm.plan(hole) == [(0, 128), (256, 0)]


def test_a_window_with_nothing_to_paint_gives_its_known_pixels_exactly():
    """Why skipping is exact: with A = I, eq. 4 gives y at every step, so the window returns y."""
    y, walk = picture(256, 256), ddnm.travel(25, 10, 3)
    out = ddnm.ddnm(ddnm.adm_eps(StandIn()), y, torch.ones(1, 1, 256, 256), ddnm.AdmSchedule(25), walk,
                    torch.randn(len(walk), 1, 3, 256, 256))
    assert torch.equal(out, y)


def test_images_under_256_pixels_a_side_are_refused_in_one_line():
    with pytest.raises(InputError, match="at least 256 pixels") as e:
        ddnm.inpaint_ddnm(picture(255, 400), centred_hole(255, 400, 50), StandIn())
    assert "\n" not in str(e.value)


@pytest.fixture
def recorded(monkeypatch):
    """Every window's call to ddnm(): its y, m and noise."""
    calls, real = [], ddnm.ddnm

    def spy(eps_theta, y, m, schedule, walk, noise, callback=None):
        calls.append((y.clone(), m.clone(), noise))
        return real(eps_theta, y, m, schedule, walk, noise, callback)

    monkeypatch.setattr(ddnm, "ddnm", spy)
    return calls


def test_known_pixels_of_the_result_are_the_inputs_exactly(device):
    x, hole = picture(320, 384).to(device), centred_hole(320, 384, 150).to(device)
    hole[..., 10:20, 370:380] = 1
    out = ddnm.inpaint_ddnm(x, hole, StandIn().to(device), DdnmOptions(steps=4))
    known = hole.expand_as(x) == 0
    assert torch.equal(out[known], x[known])
    assert (out[~known] != x[~known]).float().mean() > 0.9 and out.abs().max() <= 1


def test_each_window_starts_from_its_own_draws_of_the_one_generator(recorded):
    """The draw order: for each sampled window in order, one (len(walk), 1, 3, 256, 256) float32 draw."""
    options = DdnmOptions(steps=5, seed=7)
    ddnm.inpaint_ddnm(picture(512, 512), centred_hole(512, 512, 168), StandIn(), options)
    g = torch.Generator().manual_seed(7)
    draws = len(ddnm.travel(5, 10, 3))
    assert len(recorded) == 4
    for _, _, noise in recorded:
        assert torch.equal(noise, torch.randn(draws, 1, 3, 256, 256, generator=g))


def test_each_window_sees_the_earlier_windows_results_as_known(recorded):
    x, hole = picture(256, 384), centred_hole(256, 384, 200)
    out = ddnm.inpaint_ddnm(x, hole, StandIn(), DdnmOptions(steps=3))
    assert ddnm.plan(hole) == [(0, 0), (0, 128)] and len(recorded) == 2
    (y0, m0, _), (y1, m1, _) = recorded
    assert torch.equal(m0, 1 - hole[..., :256]) and torch.equal(y0, (x * (1 - hole))[..., :256])
    assert m1[..., :128].eq(1).all() and torch.equal(y1[..., :128], out[..., 128:256])  # window 1's left half
    assert torch.equal(m1[..., 128:], 1 - hole[..., 256:])


def test_the_same_seed_gives_the_same_picture_and_another_seed_another():
    x, hole, model = picture(256, 256), centred_hole(256, 256, 100), StandIn()
    a, b, c = (ddnm.inpaint_ddnm(x, hole, model, DdnmOptions(steps=3, seed=s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_callback_counts_every_unet_call_of_the_image():
    seen = []
    ddnm.inpaint_ddnm(picture(512, 512), centred_hole(512, 512, 136), StandIn(), DdnmOptions(steps=25),
                      callback=lambda k, t, *_: seen.append(k))
    assert seen == list(range(4 * 65))
