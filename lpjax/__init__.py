"""lpjax: Layer Parallelism (pairs of consecutive layers evaluated on the same input) for Llama inference in JAX."""

from lpjax.engine import Engine, GenerationResult
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan
from lpjax.sampling import Sampling

__all__ = ["Engine", "GenerationResult", "LPJaxError", "LPPlan", "Sampling"]
__version__ = "0.1.0"
