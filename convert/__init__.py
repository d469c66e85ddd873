"""Convert a Hugging Face Llama checkpoint or a GGUF file into lpjax's Orbax format (see lpjax/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lpjax.checkpoint import prepare_output_dir, write_checkpoint
from lpjax.cli import progress_bar
from lpjax.errors import LPJaxError
from lpjax.gguf import GGUFSource, gguf_path
from lpjax.weights import DTYPES, HFSource, global_shapes, layer_shapes, source_dtype


def convert(hf_dir: Path, out: Path, dtype: str | None = None, overwrite: bool = False, show_progress: bool = True):
    """Read `hf_dir` (an HF directory, a GGUF file or a named GGUF model) one layer at a time and write it, cast
    to `dtype` (default: as stored), to `out`."""
    gguf_file = gguf_path(str(hf_dir))
    if gguf_file is None and not hf_dir.is_dir():
        raise LPJaxError(f"--hf {hf_dir}: no such directory")
    # validates config and every tensor before anything is written
    source = GGUFSource(gguf_file) if gguf_file else HFSource(hf_dir)
    dtype = dtype or source_dtype(source)
    if dtype not in DTYPES:
        raise LPJaxError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if out.resolve() == hf_dir.resolve():
        raise LPJaxError("--out must differ from --hf")
    prepare_output_dir(out, overwrite)
    np_dtype = np.dtype(DTYPES[dtype])
    c = source.config
    views = source.checkpoint.views

    def items():
        yield None, {k: np.asarray(views[k]).astype(np_dtype) for k in global_shapes(c)}
        for i in range(c.n_layers):
            yield i, {k: np.asarray(views[f"{k}@{i}"]).astype(np_dtype) for k in layer_shapes(c)}

    bar = progress_bar(f"converting {c.n_layers} layers") if show_progress else None
    write_checkpoint(out, source.hf_config, items(), dtype, f"converted from {hf_dir.name}",
                     tokenizer_dir=source.directory, progress=bar, total=c.n_layers + 1)
    return source.config
