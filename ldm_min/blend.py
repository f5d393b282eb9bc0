"""The classic alternative to eq. 5, for auditing the paper's one design choice: blend the noisy
latent z_t, as Blended Latent Diffusion does, where Algorithm 1 projects the clean guess z_{0|t}.

`blend()` is to be read beside `sample()`, line by line. The loop is the same but for where E(y)
enters: no eq. 5, so the DDIM step goes from the unprojected z_{0|t}; after it, the known latents of
z_{t-1} are E(y) noised to the level of t-1 (eq. 1). Everything else is `sample()`'s: its arguments,
M_l, T, eta, and for a seed the same z_T and eps_z, so that the projection is all that differs
(docs/command-line.md#blend-z_t-or-project-z_0t).
"""
import torch

from . import noise


@torch.no_grad()
def blend(eps_theta, Ey, M_l, D, schedule, *, T, eta, seed, callback=None):
    """Algorithm 1's DDIM loop with Blended Latent Diffusion's step in place of eq. 5 (Avrahami,
    Fried, Lischinski, "Blended Latent Diffusion", SIGGRAPH 2023, Algorithm 1): inpaint in latent
    space and decode.

    The arguments, batches included, are `sample()`'s. Returns x_0 = D(z_0), where M_l * z_0 is
    M_l * E(y) exactly. callback(i, t, z_t_minus_1, z_0t, z_t_minus_1), if given, sees every step:
    the blended z_{t-1} stands where `sample()` passes zhat_{0|t}, as what the projection made. The
    noise: `sample()`'s draws, then one n for each step but the last, which takes E(y) itself.
    """
    # BLD also optimises the decoder per image and shrinks a dilated mask over the steps: neither is
    # done here, where D, M_l (dilation 2), T and eta are the paper's settings, as for sample().
    [z_T], eps_z, n = noise.draws(seed, Ey, 1, T * (eta > 0), T - 1)           # line 1: z_T ~ N(0, I)
    z_t = z_T                                                                   # line 5 makes it z_{t-1}: the next z_t
    for i, (t, t_minus_1) in enumerate(schedule.timesteps(T)):                  # line 2: for t = T .. 1
        abar_t, abar_t_minus_1 = schedule.abar_at(t), schedule.abar_at(t_minus_1)
        eps = eps_theta(z_t, t)                                                 # eps_theta(z_t, t), for lines 3 and 5
        z_0t = (z_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()                # line 3, eq. 3
        sigma_t = schedule.sigma(eta, abar_t, abar_t_minus_1)                   # eq. 2
        noise_t = sigma_t * eps_z[i] if eta > 0 else 0                          # sigma_t eps_z (none at eta = 0)
        z_t = abar_t_minus_1.sqrt() * z_0t + (1 - abar_t_minus_1 - sigma_t**2).sqrt() * eps + noise_t  # line 5, eq. 6
        # E(y) at t - 1 by eq. 1: sqrt(abar_{t-1}) E(y) + sqrt(1 - abar_{t-1}) n; E(y) itself at the end
        known = abar_t_minus_1.sqrt() * Ey + (1 - abar_t_minus_1).sqrt() * n[i] if t_minus_1 >= 0 else Ey
        z_t = M_l * known + (1 - M_l) * z_t                                     # BLD, Alg. 1: blend the known latents
        if callback:
            callback(i, t, z_t, z_0t, z_t)
    z_0 = z_t                                                                   # line 6: end (t - 1 = 0)
    x_0 = D(z_0)                                                                # line 7: x_0 = D(z_0)
    return x_0                                                                  # line 8
