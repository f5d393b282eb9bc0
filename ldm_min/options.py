"""The settings of one inpainting run: the paper's defaults, defined and checked here only.

The command line, the API and the benchmark all take their defaults from `Options`.
"""
import math
from dataclasses import dataclass

from .errors import InputError
from .images import LATENT_MASK_RULES
from .region import MODEL_SIDE, REGIONS

# Where E(y) enters: "paper", Algorithm 1's eq. 5 on z_{0|t} (`sample`); "blend", Blended Latent
# Diffusion's blend of z_t (`blend.blend`), the classic alternative, under the same settings.
LATENT_METHODS = ("paper", "blend")
# The seeds torch.Generator.manual_seed takes: 64-bit unsigned (it wraps a negative one round to 2^64 + seed,
# another seed's picture).
SEEDS = range(2**64)
TRAVEL_REPEATS = range(1, 11)  # RePaint's setting: jump_n_sample (its r) 10; hq demo's 3; more multiplies the calls


def check_seed(seed):
    if seed not in SEEDS:
        raise InputError(f"seed must be a whole number from 0 to {SEEDS[-1]}, got {seed}")


@dataclass(frozen=True)
class Options:
    method: str = "paper"         # one of LATENT_METHODS
    prompt: str = ""              # the paper: no prompt
    guidance: float = 7.5         # classifier-free guidance scale g, used only with a prompt (SD's usual value)
    steps: int = 30               # T, DDIM steps (the paper: 30)
    eta: float = 0.85             # DDIM eta of eq. 2 (the paper: 0.85)
    seed: int = 0
    dilate: int = 2               # latent pixels the hole grows by (the paper: 2)
    latent_mask: str = "nearest"  # how the pixel hole becomes a latent one: the paper's rule, or "cover"
    invert_mask: bool = False     # black marks the hole instead of white
    paste_back: bool = False      # put the known pixels back over D(z_0); off: the output is the paper's
    feather: int = 0              # with paste_back: blend over this many pixels
    region: str = "auto"          # "full": the whole image, as the paper; "auto": a crop around the hole of big images
    region_margin: int = 128      # pixels of context around the hole in that crop, at the model's scale

    def __post_init__(self):
        """Refuse out-of-range settings when they are made, before any work is done."""
        if not 1 <= self.steps <= 1000:
            raise InputError(f"steps must be between 1 and 1000, got {self.steps}")
        check_seed(self.seed)
        for name, value in (("guidance", self.guidance), ("eta", self.eta)):
            if not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value}")
        if not 0 <= self.eta <= 1:  # eq. 2, 1 is DDPM; above it sigma_t^2 can pass 1 - abar_{t-1}, under eq. 6's root
            raise InputError(f"eta must be between 0 and 1, got {self.eta}")
        for name, value in (("mask dilation", self.dilate), ("feather", self.feather)):
            if value < 0:
                raise InputError(f"{name} must be >= 0, got {value}")
        if self.method not in LATENT_METHODS:
            raise InputError(f"method must be paper or blend, got {self.method!r}")
        if self.latent_mask not in LATENT_MASK_RULES:
            raise InputError(f"latent mask rule must be nearest or cover, got {self.latent_mask!r}")
        if self.region not in REGIONS:
            raise InputError(f"region must be auto or full, got {self.region!r}")
        if not 0 <= self.region_margin < MODEL_SIDE // 2:
            raise InputError(f"region margin must be between 0 and {MODEL_SIDE // 2 - 1}, got {self.region_margin}")


@dataclass(frozen=True)
class DdnmOptions:
    """The settings of a DDNM run (the paper's baseline, `ldm_min.ddnm`): DDNM's hq demo defaults
    (wyhuai/DDNM, hq_demo/confs/inet256.yml) but for T, the paper's 25."""
    steps: int = 25           # T, respaced steps spanning all 1000 (the paper: 25; hq demo: 100)
    travel_length: int = 10   # time travel: back this many steps (hq demo's jump_length)
    travel_repeat: int = 3    # ... each stretch sampled this many times in all (hq demo's jump_n_sample)
    seed: int = 0
    invert_mask: bool = False  # black marks the hole instead of white

    def __post_init__(self):
        if not 1 <= self.steps <= 1000:
            raise InputError(f"steps must be between 1 and 1000, got {self.steps}")
        check_seed(self.seed)
        if self.travel_length < 1:
            raise InputError(f"travel length must be at least 1, got {self.travel_length}")
        if self.travel_repeat not in TRAVEL_REPEATS:  # each repeat draws a window's noise for every step walked
            raise InputError(f"travel repeat must be between 1 and {TRAVEL_REPEATS[-1]}, got {self.travel_repeat}")
