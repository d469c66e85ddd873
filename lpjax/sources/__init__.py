"""Where weights come from. Every source is a `weights.WeightSource`: it knows the model's config and hands out
canonical weights (lpjax/schema.py) already placed with the shardings asked for, one layer at a time.

- `hf.HFSource`: a Hugging Face directory (memory-mapped safetensors, no torch).
- `converted.OrbaxSource`: lpjax's converted format (one Orbax checkpoint per layer).
- `random_weights.RandomSource`: `random:NAME`, random weights at a preset's shape.
- `gguf.GGUFSource`: a GGUF file (llama.cpp's format, dequantised on reading), or a named one (`smollm2`).

A new format plugs in one of two ways. If its tensors can be named as HF names them (as `gguf.GGUFSource` does),
subclass `hf.HFNamedSource`, set `config`, `hf_config`, `description`, `directory` and call
`self.index({hf_name: numpy array})`: checking, layouts and placement then come from the schema. Otherwise
subclass `WeightSource` and implement `read`. Then add its detection to `open_source`.
"""

from __future__ import annotations

from pathlib import Path

from lpjax.errors import LPJaxError
from lpjax.weights import WeightSource


def open_source(model: str, seed: int = 0) -> WeightSource:
    """`random:NAME`, a GGUF file or named GGUF model, a converted lpjax directory, or an HF directory."""
    if model.startswith("random:"):
        from lpjax.sources.random_weights import RandomSource

        return RandomSource(model.split(":", 1)[1], seed)
    from lpjax.sources.gguf import GGUFSource, gguf_path

    if (gguf_file := gguf_path(model)) is not None:
        return GGUFSource(gguf_file)
    path = Path(model)
    if not path.exists():
        hint = " (lpjax reads local directories only; download the checkpoint first)" if (
            model.count("/") == 1 and not model.startswith((".", "/"))) else ""
        raise LPJaxError(f"--model {model}: no such file or directory{hint}")
    if not path.is_dir():
        raise LPJaxError(f"--model {model}: not a directory or GGUF file (expected an HF or lpjax model directory, a "
                         "GGUF file, or random:NAME)")
    from lpjax.sources.converted import OrbaxSource, is_converted

    if is_converted(path):
        return OrbaxSource(path)
    from lpjax.sources.hf import HFSource

    return HFSource(path)
