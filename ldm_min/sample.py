"""Algorithm 1 of Kakinuma et al.: DDNM's projection done on Stable Diffusion's latents.

To be read beside the paper: every line carries its line of Algorithm 1 or its equation, and the
names are its symbols (z_0t for z_{0|t}, zhat_0t for its projection, t_minus_1 for the timestep the
step goes to). `blend.py` and `ddnm.py` are the two samplers it is compared with, written the same
way; `pipeline.py` turns a photo and its mask into the inputs below. The arithmetic is float32
whatever the models' dtype.
"""
import torch

from . import noise


@torch.no_grad()
def sample(eps_theta, Ey, M_l, D, schedule, *, T, eta, seed, callback=None):
    """Algorithm 1: inpaint in latent space and decode.

    eps_theta(z_t, t): the UNet's noise prediction. Ey: E(y), the scaled posterior mean of the
    known image, (1, 4, h, w). M_l: the latent mask, (1, 1, h, w), 1 where the latent is known
    (`images.latent_known_mask`). D: the decoder. schedule: abar_t, the timesteps and sigma_t
    (`schedule.Schedule`). T, eta: the paper's 30 and 0.85. Returns x_0 = D(z_0).
    callback(i, t, z_t_minus_1, z_0t, zhat_0t), if given, sees step i (0 .. T-1) after line 5.
    B images of one size go through at once as a batch: Ey (B, 4, h, w), M_l (B, 1, h, w), and
    `seed` a list of B seeds, one per image (an int is the seed of a single image; a CPU
    torch.Generator is drawn from where it stands, `noise.draws`).
    """
    # z_T and every step's eps_z are drawn up front, from each image's own seeded CPU generator, so
    # that a seed gives the same picture on any device and in any batch (docs/conventions.md).
    [z_T], eps_z = noise.draws(seed, Ey, 1, T * (eta > 0))                      # line 1: z_T ~ N(0, I)
    z_t = z_T                                                                   # line 5 makes it z_{t-1}: the next z_t
    for i, (t, t_minus_1) in enumerate(schedule.timesteps(T)):                  # line 2: for t = T .. 1
        abar_t, abar_t_minus_1 = schedule.abar_at(t), schedule.abar_at(t_minus_1)
        eps = eps_theta(z_t, t)                                                 # eps_theta(z_t, t), for lines 3 and 5
        z_0t = (z_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()                # line 3, eq. 3
        zhat_0t = M_l * Ey + (1 - M_l) * z_0t                                   # line 4, eq. 5
        sigma_t = schedule.sigma(eta, abar_t, abar_t_minus_1)                   # eq. 2
        noise_t = sigma_t * eps_z[i] if eta > 0 else 0                          # sigma_t eps_z (none at eta = 0)
        z_t = abar_t_minus_1.sqrt() * zhat_0t + (1 - abar_t_minus_1 - sigma_t**2).sqrt() * eps + noise_t  # line 5, eq. 6
        if callback:
            callback(i, t, z_t, z_0t, zhat_0t)
    z_0 = z_t                                                                   # line 6: end (t - 1 = 0)
    x_0 = D(z_0)                                                                # line 7: x_0 = D(z_0)
    return x_0                                                                  # line 8
