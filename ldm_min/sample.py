"""Algorithm 1 of Kakinuma et al. (`sample`), and the inpainting around it (`inpaint`).

Equation and line numbers are the paper's (the README's equation map lists them). The sampler's
own arithmetic is float32 whatever the models' dtype.
"""
from dataclasses import replace

import torch

from . import images, region
from .errors import NonFiniteError
from .options import Options


@torch.no_grad()
def sample(eps_theta, Ey, M_l, D, schedule, *, T, eta, seed, callback=None):
    """Algorithm 1: inpaint in latent space and decode.

    eps_theta(z_t, t): the noise prediction. Ey: E(y), the scaled posterior mean of the known
    image, (1, 4, h, w). M_l: the latent mask, 1 where the latent is known (docs/conventions.md;
    `images.latent_known_mask`: the paper's rule `nearest` samples the pixel hole at (8i, 8j), and
    misses strokes thinner than 8 pixels; `cover` makes every latent pixel whose 8x8 cell holds a
    hole pixel a hole, for thin or scribbled masks).
    D: the decoder. schedule: abar_t, the timesteps and sigma_t (`schedule.Schedule`). Returns
    x_0 = D(z_0). callback(i, t, z_prev, z0, z0_hat), if given, sees every step.
    """
    # Every draw is float32 on one CPU generator, in a fixed order, so a seed gives the same
    # picture on any device: z_T first, then one eps_z per step when eta > 0 (docs/conventions.md).
    # All are drawn before the loop and moved in one copy: a copy to a GPU waits for it to finish
    # its queued work, and inside the loop that would stall every step.
    generator = torch.Generator().manual_seed(seed)
    draws = torch.stack([torch.randn(Ey.shape, generator=generator) for _ in range(1 + T * (eta > 0))])
    z, *eps_zs = draws.to(Ey.device)                                              # line 1: z_T ~ N(0, I)
    for i, (t, t_prev) in enumerate(schedule.timesteps(T)):                       # line 2: for t = T .. 1 (to line 6)
        abar_t, abar_prev = schedule.abar_at(t), schedule.abar_at(t_prev)
        eps = eps_theta(z, t)                                                     # used by lines 3 and 5
        z0 = (z - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()                      # line 3, eq. 3
        z0_hat = M_l * Ey + (1 - M_l) * z0                                        # line 4, eq. 5
        sigma = schedule.sigma(eta, abar_t, abar_prev)                            # eq. 2
        eps_z = eps_zs[i] if eta > 0 else 0
        z = abar_prev.sqrt() * z0_hat + (1 - abar_prev - sigma**2).sqrt() * eps + sigma * eps_z  # line 5, eq. 6
        if callback:
            callback(i, t, z, z0, z0_hat)
    x0 = D(z)                                                                     # line 7: x_0 = D(z_0)
    return x0                                                                     # line 8


def eps_model(models, prompt, guidance):
    """eps_theta(z_t, t) of `models`, float32 in and out. With a prompt, classifier-free guidance
    eps_u + g (eps_c - eps_u) from one batch-2 UNet pass; without one (or at g = 1, where that is
    just eps_c), one pass on the prompt's embedding (docs/conventions.md)."""
    guided = bool(prompt) and guidance != 1
    context = models.encode_text(prompt)
    if guided:
        context = torch.cat([models.encode_text(""), context])  # [unconditional, conditional]

    def eps_theta(z, t):
        # t goes in as a tensor on the UNet's device: a compiled UNet takes that as an input,
        # where it would compile anew for each new Python int. torch.full writes it there, where
        # torch.tensor would copy it from the CPU and wait for the GPU.
        z = z.to(models.dtype).expand(len(context), -1, -1, -1)
        eps = models.unet(z, torch.full((), t, device=z.device), context).float()
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        return eps

    return eps_theta


@torch.no_grad()
def inpaint(image, mask, models, options=Options(), callback=None):
    """Fill the hole of `image` (PIL) that `mask` (PIL) marks, white unless options.invert_mask;
    returns a PIL RGB image of the same size. `callback` as for `sample()`."""
    x, hole = images.prepare(image, mask, options.invert_mask)
    return images.to_pil(inpaint_tensors(x, hole, models, options, callback))


@torch.no_grad()
def inpaint_tensors(x, hole, models, options, callback=None):
    """`inpaint()` on the tensors of `images.prepare()`: x (1, 3, H, W) in [-1, 1], hole
    (1, 1, H, W), 1 = paint here. Returns the result, (1, 3, H, W) in [-1, 1]. A big image is
    inpainted in a crop around the hole (`region.box_for`), at the model's scale."""
    box = region.box_for(hole, options)
    if box:
        whole = replace(options, region="full", paste_back=False)  # the crop itself, blended over the hole after
        return region.inpaint_crop(x, hole, box, lambda x, hole: inpaint_tensors(x, hole, models, whole, callback))
    x, hole = x.to(models.device), hole.to(models.device)
    x8, hole8 = images.pad_to_8(x, hole)
    models.check_memory(*x8.shape[-2:])
    y = x8 * (1 - hole8)                                              # y = M_p * x: holes at 0, mid-grey
    Ey = models.vae.encode(y.to(models.dtype)).float()                # E(y), computed once
    M_l = images.latent_known_mask(hole8, options.dilate, options.latent_mask)
    images.check_latent_hole(hole8, M_l)
    D = lambda z: models.vae.decode(z.to(models.dtype)).float()
    x0 = sample(eps_model(models, options.prompt, options.guidance), Ey, M_l, D, models.schedule,
                T=options.steps, eta=options.eta, seed=options.seed, callback=callback)
    if not torch.isfinite(x0).all():
        dtype = str(models.dtype).removeprefix("torch.")
        advice = {"float16": "float16 overflowed: run again with --dtype bfloat16 or float32",
                  "bfloat16": "run again with --dtype float32"}.get(
            dtype, "the model itself gave non-finite values: corrupt weights, or an extreme guidance?")
        raise NonFiniteError(f"sampling produced inf/NaN in {dtype}: {advice}")
    x0 = x0[..., :x.shape[-2], :x.shape[-1]]                          # crop the padding back off
    if options.paste_back:
        x0 = images.paste_back(x0, x, hole, options.feather)
    return x0
