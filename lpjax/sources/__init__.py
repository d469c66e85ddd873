"""Where weights come from. Every source is a `weights.WeightSource`: it knows the model's config and hands out
canonical weights (lpjax/schema.py) already placed with the shardings asked for, one layer at a time.

- `hf.HFSource`: a Hugging Face directory (memory-mapped safetensors, no torch).
- `converted.OrbaxSource`: lpjax's converted format (one Orbax checkpoint per layer).
- `random_weights.RandomSource`: `random:NAME`, random weights at a preset's shape.
- `gguf.GGUFSource`: a GGUF file (llama.cpp's format, dequantised on reading, or with `--quantize gguf` its Q8_0,
  Q4_0 and Q4_1 matrices kept as they are), or a named one (`smollm2`).

A new format plugs in one of two ways. If its tensors can be named as HF names them (as `gguf.GGUFSource` does),
subclass `hf.HFNamedSource`, set `config`, `hf_config`, `description`, `directory` and call
`self.index({hf_name: numpy array})`: checking, layouts and placement then come from the schema. Otherwise
subclass `WeightSource` and implement `read`. Then add its detection to `open_source`.
"""

from __future__ import annotations

from pathlib import Path

from lpjax.config import recorded_plan
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan
from lpjax.quantize import QuantSpec
from lpjax.weights import WeightSource


def open_source(model: str, seed: int = 0, quantize: QuantSpec | None = None) -> WeightSource:
    """`random:NAME`, a GGUF file or named GGUF model, a converted lpjax directory, or an HF directory. A GGUF file
    hands over its own quantized matrices where they map when `quantize` is `--quantize gguf`."""
    if model.startswith("random:"):
        from lpjax.sources.random_weights import RandomSource

        return RandomSource(model.split(":", 1)[1], seed)
    from lpjax.sources.gguf import GGUFSource, gguf_path

    if (gguf_file := gguf_path(model)) is not None:
        return GGUFSource(gguf_file, native=quantize is not None and quantize.kind == "gguf")
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


def trained_plan(source: WeightSource) -> str | None:
    """The LP plan a fine-tuned model records (config.json's `lpjax.lp`, or for an lpjax fine-tune written before
    config.json carried it, lpjax.json's `training.lp`); None for any other model."""
    lp = recorded_plan(source.hf_config or {})
    if lp is None:
        training = (getattr(source, "meta", None) or {}).get("training")
        lp = training.get("lp") if isinstance(training, dict) else None
    if lp is None:
        return None
    try:
        LPPlan.parse(lp, source.config.n_layers)
    except LPJaxError as e:
        raise LPJaxError(f"{source.description}: the LP plan {lp!r} its config.json records does not fit it "
                         f"({e})") from None
    return lp


def plan_for(source: WeightSource, lp: str | None) -> str:
    """The plan to run `source` under: `lp` when given (even '', sequential), else the plan it was fine-tuned for,
    else sequential. What a tool's `--lp` left out means (`lpjax.finetune`; `Engine.load` with `lp=None`)."""
    if lp is not None:
        return lp
    return trained_plan(source) or ""
