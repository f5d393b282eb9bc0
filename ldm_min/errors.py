"""The errors ldm_min raises on purpose. Each message is one line a user can act on; the
command line prints it and exits with status 2."""


class LdmMinError(Exception):
    """Base class: everything ldm_min reports to the user."""


class WeightsError(LdmMinError):
    """The checkpoint cannot be found, downloaded or loaded."""


class InputError(LdmMinError, ValueError):
    """An image, a mask or an option is not usable."""


class NonFiniteError(LdmMinError, FloatingPointError):
    """Sampling produced inf or NaN: float16 overflow, corrupt weights or an extreme guidance."""
