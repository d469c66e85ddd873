"""Convert a model into lpjax's Orbax format or export it as a Hugging Face Llama directory (see lpjax/export.py).

`python -m lpjax.convert` is the command; in a checkout, `python -m convert` forwards to it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lpjax.config import ModelConfig
from lpjax.errors import LPJaxError
from lpjax.export import export
from lpjax.quantize import QuantSpec
from lpjax.sources.hf import HFSource


def convert(hf_dir: Path, out: Path, dtype: str | None = None, overwrite: bool = False, show_progress: bool = True,
            fmt: str = "lpjax", progress: Callable[[int, int], None] | None = None) -> ModelConfig:
    """Read the HF directory `hf_dir` one layer at a time and write it, cast to `dtype` (default: as stored), to
    `out` in `fmt`. `show_progress` without `progress` draws the usual bar."""
    if not Path(hf_dir).is_dir():
        raise LPJaxError(f"--hf {hf_dir}: no such directory")
    return convert_model(HFSource(Path(hf_dir)), out, dtype, overwrite, fmt, _bar(show_progress, progress))[0]


def convert_model(source, out: Path, dtype: str | None = None, overwrite: bool = False, fmt: str = "lpjax",
                  progress: Callable[[int, int], None] | None = None,
                  quantize: QuantSpec | None = None) -> tuple[ModelConfig, str | None]:
    """Any opened source (`lpjax.sources.open_source`) to `out`, its matrices quantized as `quantize` says; returns
    its config and a note for the user."""
    note = export(source, Path(out), fmt, dtype, overwrite, progress, quantize)
    return source.config, note


def _bar(show: bool, progress):
    if progress is not None or not show:
        return progress
    from lpjax.cli import progress_bar

    return progress_bar("converting")
