"""lpjax: Layer Parallelism (pairs of consecutive layers evaluated on the same input) for Llama inference in JAX."""

import importlib

__all__ = ["Engine", "GenerationResult", "LPJaxError", "LPPlan", "QuantSpec", "Sampling"]
__version__ = "0.1.0"

_HOMES = {"Engine": "lpjax.engine", "GenerationResult": "lpjax.engine", "LPJaxError": "lpjax.errors",
          "LPPlan": "lpjax.plan", "QuantSpec": "lpjax.quantize", "Sampling": "lpjax.sampling"}


def __getattr__(name: str):
    """Import on first use, so `import lpjax.config` (or the torch-side benchmarks) does not pull in jax."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'lpjax' has no attribute {name!r}")
