"""DDNM (Wang et al., ICLR 2023), the paper's baseline: eq. 4 in pixels on guided-diffusion's 256 px
ADM UNet, as DDNM's official "hq demo" runs it (wyhuai/DDNM, hq_demo/guided_diffusion), over images
of any size from 256 px up by the windows of the authors' fork (Yus314/DDNM-for-inpainting).

`ddnm()` is the sampler on one 256 window, to be read beside `sample()`: eq. 3, then eq. 4 where
`sample()` has eq. 5, then a step. `inpaint_ddnm()` runs it window by window. Where the sources
disagree, docs/table1.md says what is done here and why.
"""
import itertools

import torch

from .adm import SCHEDULE
from .errors import InputError, LdmMinError, NonFiniteError
from .options import DdnmOptions

WINDOW, STRIDE = 256, 128  # the ADM's training size; the fork's windows overlap by half


class AdmSchedule:
    """The ADM's linear betas (`adm.SCHEDULE`: 1e-4 to 0.02 over 1000 steps), respaced to T steps
    that span all 1000 as guided-diffusion's `space_timesteps(1000, "T")` picks them, with the DDPM
    posterior q(x_{t-1} | x_t, x_0) of the respaced chain. float64, then float32 (as there)."""

    def __init__(self, T, cfg=SCHEDULE):
        n = cfg["num_train_timesteps"]
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float64)
        # Step i is timestep round(i * stride), the stride summed in floats as guided-diffusion sums
        # it (Python's round: halves to even). T = 25: 0, 42, 83, 125, 166, ..., 957, 999.
        stride = (n - 1) / (T - 1) if T > 1 else 1
        self.timesteps = [round(s) for s in itertools.accumulate([stride] * (T - 1), initial=0.0)]
        abar = torch.cumprod(1 - betas, 0)[self.timesteps]               # abar_t of the kept steps, eq. 1
        abar_t_minus_1 = torch.cat([abar.new_ones(1), abar[:-1]])        # of the kept step below; below step 0: 1
        beta = 1 - abar / abar_t_minus_1                                 # the respaced chain's betas
        self.abar, self.beta = abar.float(), beta.float()
        self.coef_x0 = (beta * abar_t_minus_1.sqrt() / (1 - abar)).float()            # posterior mean's weight of x_0
        self.coef_xt = ((1 - abar_t_minus_1) * (1 - beta).sqrt() / (1 - abar)).float()  # ... and of x_t
        self.sigma = (beta * (1 - abar_t_minus_1) / (1 - abar)).float().sqrt()        # posterior std; 0 at step 0


def travel(T, length, repeat):
    """hq demo's time-travel walk over the step indices (RePaint's `get_schedule_jump` with its
    n_sample 1): down from T-1 to -1, one step at a time; on reaching a multiple j of `length`
    below T - length, back up `length` steps and down again, until that stretch has been walked
    `repeat` times. Each step down is one UNet call."""
    jumps = {j: repeat - 1 for j in range(0, T - length, length)}
    walk, i = [], T
    while i > 0:
        i -= 1
        walk.append(i)
        if jumps.get(i):
            jumps[i] -= 1
            walk += range(i + 1, i + length + 1)
            i += length
    return walk + [-1]


def calls_per_window(walk):
    """UNet calls of one window: the steps down. T = 25, length 10, repeat 3: 25 + 2 * 2 * 10 = 65."""
    return sum(b < a for a, b in zip(walk, walk[1:]))


@torch.no_grad()
def ddnm(eps_theta, y, m, schedule, walk, noise, callback=None):
    """DDNM on one window, as hq demo runs it: returns xhat_{0|0}, whose known pixels are y's.

    eps_theta(x_t, t): the ADM's eps (its first 3 output channels). y: the observation A x, the known
    pixels, (B, 3, 256, 256) in [-1, 1], 0 in the hole; m: (B, 1, 256, 256), 1 where known:
    A = A† = diag(m). Eq. 4 is DDNM's A†y + (I - A†A) x_{0|t}; the paper prints A†Ay, a typo that
    changes nothing here: with a 0/1 mask, A†Ay = m * m * y = A†y.
    schedule: `AdmSchedule`; walk: `travel()`'s. noise: (len(walk), B, 3, 256, 256): x_T, then one
    draw per move of the walk. callback(k, t, x_t_minus_1, x_0t, xhat_0t), if given, sees every UNet call.
    Where `sample()` takes a DDIM step (eq. 2 with eta, the paper's §2.2 reading of DDNM), hq demo,
    whose code made Table 1's DDNM numbers, takes the DDPM posterior step from xhat_{0|t} and x_t
    with the fixed posterior variance (the learned one is discarded for sigma_y = 0): followed here.
    """
    x_t = noise[0]                                                                # x_T ~ N(0, I)
    k = 0
    for n, (i, i_next) in enumerate(zip(walk, walk[1:])):                         # hq demo's loop over the walk
        if i_next > i:                                                            # time travel: x_{t+1} ~ q(. | x_t)
            beta = schedule.beta[i_next]
            x_t = (1 - beta).sqrt() * x_t + beta.sqrt() * noise[n + 1]
            continue
        t, abar_t = schedule.timesteps[i], schedule.abar[i]
        eps = eps_theta(x_t, t)                                                   # eps_theta(x_t, t)
        x_0t = ((x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()).clamp(-1, 1)   # eq. 3, clipped (clip_denoised)
        xhat_0t = m * y + (1 - m) * x_0t                                          # eq. 4: A†y + (I - A†A) x_{0|t}
        x_t = schedule.coef_x0[i] * xhat_0t + schedule.coef_xt[i] * x_t + schedule.sigma[i] * noise[n + 1]  # DDPM step
        if callback:
            callback(k, t, x_t, x_0t, xhat_0t)
        k += 1
    return xhat_0t                                                                # hq demo's result: xhat_{0|0}


def windows(height, width):
    """The top-left corners of the fork's 256 windows, row by row: stride 128, the last row and
    column flush with the image's edge. 512 x 512: (0, 128, 256) x (0, 128, 256)."""
    starts = lambda n: sorted({*range(0, n - WINDOW, STRIDE), n - WINDOW})
    return [(top, left) for top in starts(height) for left in starts(width)]


def plan(hole):
    """The windows that are sampled, in order, for `hole` (.., H, W), 1 = paint here: those that
    still hold a hole pixel when their turn comes. A finished window counts as known (the fork), so
    which ones are sampled depends on the mask only. A skipped window's result is its known pixels:
    what DDNM gives for a window with nothing to paint (eq. 4 with A = I), without the calls."""
    if min(hole.shape[-2:]) < WINDOW:
        h, w = hole.shape[-2:]
        raise InputError(f"image is {w}x{h}: DDNM's ADM paints {WINDOW}x{WINDOW} windows, so each side must "
                         f"be at least {WINDOW} pixels (scale the image up first)")
    left = hole.bool().clone()
    sampled = []
    for top, lft in windows(*hole.shape[-2:]):
        box = (..., slice(top, top + WINDOW), slice(lft, lft + WINDOW))
        if left[box].any():
            sampled.append((top, lft))
            left[box] = False
    return sampled


def unet_calls(hole, options):
    """(UNet calls of this run, calls with every window sampled as the fork runs them). Table 1's
    holes at 512 px: 4 x 65 = 260 here, 9 x 65 = 585 there (the paper's timing)."""
    per_window = calls_per_window(travel(options.steps, options.travel_length, options.travel_repeat))
    return len(plan(hole)) * per_window, len(windows(*hole.shape[-2:])) * per_window


def adm_eps(model):
    """eps_theta(x_t, t) of guided-diffusion's ADM `model`, float32 in and out: the first 3 of its 6
    output channels (the other 3 are its learned variance, which hq demo does not use)."""
    dtype = next(model.parameters()).dtype

    def eps_theta(x, t):
        return model(x.to(dtype), torch.full((len(x),), t, device=x.device))[:, :3].float()

    return eps_theta


@torch.no_grad()
def inpaint_ddnm(x, hole, model, options=DdnmOptions(), callback=None):
    """DDNM's fill of `hole` in x, window by window (`plan`): x (1, 3, H, W) in [-1, 1], H and W at
    least 256, hole (1, 1, H, W), 1 = paint here. Returns (1, 3, H, W) on the model's device: x's
    known pixels exactly, the hole painted. Each sampled window starts from fresh noise and sees
    every earlier window's result as known. The noise: one CPU generator seeded with options.seed;
    for each sampled window in order, one float32 draw of shape (len(walk), 1, 3, 256, 256) (see
    `ddnm`), moved to the device. callback(k, t, x_t, x0, x0_hat) sees every UNet call, k counting
    the image's calls."""
    schedule = AdmSchedule(options.steps)
    walk = travel(options.steps, options.travel_length, options.travel_repeat)
    parameter = next(model.parameters())
    eps_theta, generator = adm_eps(model), torch.Generator().manual_seed(options.seed)
    x, hole = x.to(parameter.device), hole.to(parameter.device)
    known = 1 - hole
    canvas = x * known                                                            # y = A x: 0 in the hole
    per_window = calls_per_window(walk)
    for n, (top, left) in enumerate(plan(hole)):
        box = (..., slice(top, top + WINDOW), slice(left, left + WINDOW))
        noise = torch.randn((len(walk), *canvas[box].shape), generator=generator).to(x.device)
        done = n * per_window
        seen = callback and (lambda k, *step: callback(done + k, *step))
        canvas[box] = ddnm(eps_theta, canvas[box], known[box], schedule, walk, noise, seen)
        known[box] = 1                                                            # known to the windows after it
    if not torch.isfinite(canvas).all():
        dtype = str(parameter.dtype).removeprefix("torch.")
        raise NonFiniteError(f"DDNM produced inf/NaN in {dtype}: "
                             + ("run again with --dtype float32" if dtype != "float32" else "corrupt weights?"))
    return canvas


def inpaint_pictures(pictures, model, callback=None):
    """`inpaint_ddnm()` of each (x, hole, options) of `pictures`, one after another. Returns, as
    `pipeline.inpaint_batch` does, per picture its result or the LdmMinError it failed with."""
    results = []
    for x, hole, options in pictures:
        try:
            results.append(inpaint_ddnm(x, hole, model, options, callback))
        except LdmMinError as e:
            results.append(e)
    return results
