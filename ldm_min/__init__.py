"""ldm_min: zero-shot inpainting with Stable Diffusion v1.4 (Kakinuma et al.), from scratch."""
from .errors import InputError, LdmMinError, NonFiniteError, WeightsError
from .models import Models
from .options import DdnmOptions, Options
from .pipeline import inpaint
from .sample import sample
