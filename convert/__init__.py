"""Checkout convenience: `python -m convert` is `python -m lpjax.convert` (not installed; see pyproject.toml)."""

from lpjax.convert import convert, convert_model, convert_path

__all__ = ["convert", "convert_model", "convert_path"]
