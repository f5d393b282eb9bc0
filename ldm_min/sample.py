"""Algorithm 1 of Kakinuma et al.: DDIM sampling with DDNM's projection done in latent space.

Equation and line numbers are the paper's (the README's equation map lists them). The sampler's
own arithmetic is float32 whatever the models' dtype.
"""
import torch

from . import images
from .errors import InputError, NonFiniteError


def check_options(steps=30, eta=0.85, dilate=2, feather=0):
    """Refuse out-of-range options before any work is done."""
    if not 1 <= steps <= 1000:
        raise InputError(f"steps must be between 1 and 1000, got {steps}")
    for name, value in (("eta", eta), ("mask dilation", dilate), ("feather", feather)):
        if value < 0:
            raise InputError(f"{name} must be >= 0, got {value}")


@torch.no_grad()
def sample(models, Ey, M_l, *, prompt="", guidance=7.5, steps=30, eta=0.85, seed=0, callback=None):
    """Inpaint in latent space and decode.

    Ey: E(y), the scaled posterior mean of the known image, (1, 4, h, w). M_l: the latent mask,
    1 where the latent is known, same shape or broadcastable. Returns x_0 = D(z_0), (1, 3, 8h, 8w)
    in [-1, 1]. callback(i, t, z_prev, z0, z0_hat) sees every step, if given.
    """
    check_options(steps, eta)
    unet, schedule, dtype = models.unet, models.schedule, models.dtype
    Ey, M_l = Ey.float(), M_l.float()
    guided = bool(prompt) and guidance != 1  # at g = 1, eps_u + g (eps_c - eps_u) is just eps_c
    context = models.encode_text(prompt)
    if guided:
        context = torch.cat([models.encode_text(""), context])  # [unconditional, conditional]

    def eps_theta(z, t):
        """The UNet's noise prediction; with guidance, eps_u + g (eps_c - eps_u) from one batch-2 pass.
        t goes in as a tensor on the UNet's device: a compiled UNet takes that as an input, where it
        would compile anew for each new Python int."""
        eps = unet(z.to(dtype).expand(len(context), -1, -1, -1), torch.tensor(t, device=z.device), context).float()
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        return eps

    # Every draw is float32 on one CPU generator, in a fixed order, so a seed gives the same
    # picture on any device: z_T first, then one eps_z per step (README, Conventions).
    generator = torch.Generator().manual_seed(seed)
    noise = lambda: torch.randn(Ey.shape, generator=generator).to(Ey.device)

    z = noise()                                                                   # line 1: z_T ~ N(0, I)
    for i, t in enumerate(schedule.timesteps(steps)):                             # line 2: for t = T .. 1 (to line 6)
        abar_t, abar_prev = schedule.abar[t], schedule.abar_prev(t, steps)
        eps = eps_theta(z, t)
        z0 = (z - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()                      # line 3, eq. 3
        z0_hat = M_l * Ey + (1 - M_l) * z0                                        # line 4, eq. 5
        sigma = schedule.sigma(eta, abar_t, abar_prev)                            # eq. 2
        eps_z = noise() if eta > 0 else 0
        z = abar_prev.sqrt() * z0_hat + (1 - abar_prev - sigma**2).sqrt() * eps + sigma * eps_z  # line 5, eq. 6
        if callback:
            callback(i, t, z, z0, z0_hat)
    x0 = models.vae.decode(z.to(dtype)).float()                                  # line 7: x_0 = D(z_0)
    if not torch.isfinite(x0).all():
        raise NonFiniteError(f"sampling produced inf/NaN in {str(dtype).removeprefix('torch.')}: "
                             f"run again with --dtype float32 (or bfloat16)")
    return x0                                                                     # line 8


@torch.no_grad()
def inpaint(image, mask, models, *, prompt="", guidance=7.5, steps=30, eta=0.85, seed=0, dilate=2,
            invert_mask=False, paste_back=False, feather=0, callback=None):
    """Fill the holes of `image` (PIL) marked white in `mask` (PIL); returns a PIL RGB image of the
    same size. The preparation around `sample()` follows the README's Conventions."""
    check_options(steps, eta, dilate, feather)
    image, mask = images.prepare(image, mask, invert_mask)
    x = images.to_tensor(image).to(models.device)                     # (1, 3, H, W) in [-1, 1]
    hole = images.to_hole(mask).to(models.device)                     # (1, 1, H, W), 1 = paint here
    x8, hole8 = images.pad_to_8(x, hole)
    models.check_memory(*x8.shape[-2:])
    y = x8 * (1 - hole8)                                              # y = M_p * x: holes at 0, mid-grey
    Ey = models.vae.encode(y.to(models.dtype)).float()                # E(y), computed once
    M_l = images.latent_known_mask(hole8, dilate)
    x0 = sample(models, Ey, M_l, prompt=prompt, guidance=guidance, steps=steps, eta=eta, seed=seed,
                callback=callback)
    x0 = x0[..., :x.shape[-2], :x.shape[-1]]                          # crop the padding back off
    if paste_back:
        x0 = images.paste_back(x0, x, hole, feather)
    return images.to_pil(x0)
