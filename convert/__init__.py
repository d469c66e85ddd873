"""Checkout convenience: `python -m convert` is `python -m lpjax.convert` (not installed; see pyproject.toml)."""

from lpjax.convert import convert, convert_model

__all__ = ["convert", "convert_model"]
