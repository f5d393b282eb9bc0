"""The DDIM noise schedule: abar_t, the T sampling timesteps, sigma_t(eta).

Constants come from the checkpoint's `scheduler/scheduler_config.json` (v1.4: beta from
0.00085 to 0.012, "scaled_linear", 1000 training steps, steps_offset 1, set_alpha_to_one false).
"""
import torch

from .errors import WeightsError


class Schedule:
    def __init__(self, cfg):
        if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear" or cfg.get("trained_betas"):
            raise WeightsError(f"scheduler config: only the 'scaled_linear' beta schedule of Stable Diffusion v1 "
                               f"is supported, found {cfg.get('beta_schedule')!r}")
        self.num_train_timesteps = cfg.get("num_train_timesteps", 1000)
        self.steps_offset = cfg.get("steps_offset", 1)
        # "scaled_linear": beta is linear in sqrt, between the config's beta_start and beta_end.
        betas = torch.linspace(cfg.get("beta_start", 0.00085) ** 0.5, cfg.get("beta_end", 0.012) ** 0.5,
                               self.num_train_timesteps, dtype=torch.float32) ** 2
        # abar_t = prod_{s<=t} alpha_s, eq. 1 (printed up to T: a typo); alpha_s = 1 - beta_s. Entry t is
        # the product of t + 1 alphas: the code's timesteps count 0 .. 999 where the paper's count 1 .. 1000.
        self.abar = torch.cumprod(1 - betas, dim=0)
        # abar_{t-1} of the last step, whose t - 1 is below every trained timestep. The paper's abar_0 is
        # the empty product, 1: sigma_1 = 0 and z_0's known latents would be E(y) exactly. v1.4's config
        # (set_alpha_to_one false), SD's own DDIM samplers and the authors' code take abar[0] = 0.99915:
        # the last step then keeps noise of std 0.03 (docs/conventions.md#where-ldm_min-departs-from-the-paper).
        self.abar_final = torch.tensor(1.0) if cfg.get("set_alpha_to_one", False) else self.abar[0]

    def timesteps(self, T):
        """The (t, t - 1) pairs of a T-step DDIM run in sampling order, r = 1000 // T apart (v1.4):
        t = (T-1)r + offset, ..., r + offset, offset, and its "t - 1", the timestep the step goes to,
        t - r (below 0 at the last step). T = 30: (958, 925), (925, 892), ..., (1, -32).
        At T = 1000 the offset would push the first t past the last trained timestep; it is 0 there."""
        r = self.num_train_timesteps // T
        offset = min(self.steps_offset, self.num_train_timesteps - 1 - (T - 1) * r)
        return [(i * r + offset, (i - 1) * r + offset) for i in reversed(range(T))]

    def abar_at(self, t):
        """abar_t; below timestep 0 (the last step's t - 1), the config's final value."""
        return self.abar[t] if t >= 0 else self.abar_final

    @staticmethod
    def sigma(eta, abar_t, abar_t_minus_1):
        """sigma_t(eta) of eq. 2 in the standard DDIM form: the paper prints the last factor as
        sqrt((1 - abar_t) / abar_{t-1}), a typo that can make eq. 6's sqrt(1 - abar_{t-1} - sigma_t^2)
        imaginary."""
        # sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
        return eta * ((1 - abar_t_minus_1) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_t_minus_1).sqrt()
