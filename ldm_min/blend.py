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
    M_l * E(y) exactly. callback(i, t, z_prev, z0, z_prev), if given, sees every step: the blended
    z_{t-1} stands where `sample()` passes zhat_{0|t}, as what the projection made. The noise:
    `sample()`'s draws, then one n for each step but the last, which takes E(y) itself.
    """
    # BLD also optimises the decoder per image and shrinks a dilated mask over the steps: neither is
    # done here, where D, M_l (dilation 2), T and eta are the paper's settings, as for sample().
    [z], eps_zs, ns = noise.draws(seed, Ey, 1, T * (eta > 0), T - 1)              # line 1: z_T ~ N(0, I)
    for i, (t, t_prev) in enumerate(schedule.timesteps(T)):                       # line 2: for t = T .. 1 (to line 6)
        abar_t, abar_prev = schedule.abar_at(t), schedule.abar_at(t_prev)
        eps = eps_theta(z, t)                                                     # used by lines 3 and 5
        z0 = (z - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()                      # line 3, eq. 3
        sigma = schedule.sigma(eta, abar_t, abar_prev)                            # eq. 2
        eps_z = eps_zs[i] if eta > 0 else 0
        z = abar_prev.sqrt() * z0 + (1 - abar_prev - sigma**2).sqrt() * eps + sigma * eps_z  # line 5, eq. 6: z_{0|t}
        known = abar_prev.sqrt() * Ey + (1 - abar_prev).sqrt() * ns[i] if t_prev >= 0 else Ey  # E(y) at t-1 (eq. 1)
        z = M_l * known + (1 - M_l) * z                                           # BLD, Alg. 1: blend the known latents
        if callback:
            callback(i, t, z, z0, z)
    x0 = D(z)                                                                     # line 7: x_0 = D(z_0)
    return x0                                                                     # line 8
