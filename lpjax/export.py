"""Writing a model out, from any source lpjax loads: lpjax's converted format (`lpjax`, the default) or a Hugging
Face Llama directory (`hf`: safetensors, config.json, tokenizer files) that transformers loads.

Weights are written as they are: an LP fine-tune exported to HF keeps its trained weights, but the plan it was tuned
for is not part of a Llama: transformers runs the layers one after the other. config.json records the plan under
`lpjax.lp` (`config.with_plan`, in both formats), and lpjax runs the directory under it when no --lp is given
(`sources.plan_for`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.config import PLAN_KEY, to_hf, with_plan
from lpjax.errors import LPJaxError
from lpjax.quantize import QuantizedWeight, QuantSpec
from lpjax.schema import global_shapes, layer_shapes
from lpjax.sources import trained_plan
from lpjax.sources.converted import is_converted, write_checkpoint
from lpjax.sources.hf import write_hf
from lpjax.tokenizer import copy_tokenizer
from lpjax.weights import DTYPES, WeightSource, as_held, resolve_quantize, source_dtype

FORMATS = ("lpjax", "hf")
EXPORT_KEY = PLAN_KEY  # the config.json key of an HF export: where it came from, the LP plan it was tuned for


def is_hf_export(path: Path) -> bool:
    try:
        return EXPORT_KEY in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything a user already has, unless asked to (and then only over lpjax's own output)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise LPJaxError(f"--out {out}: already exists and is not empty (pass --overwrite to replace it)")
        if not (out.is_dir() and (is_converted(out) or is_hf_export(out))):
            raise LPJaxError(
                f"--out {out}: --overwrite only replaces an lpjax checkpoint or export directory, and this is not one")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def source_items(source: WeightSource, dtype: str,
                 quantize: QuantSpec | None = None) -> Iterator[tuple[int | None, dict[str, np.ndarray]]]:
    """(None, globals), then (layer, its weights), as host numpy arrays in `dtype`, one layer at a time; the matrices
    held as `quantize` says (`weights.as_held`: quantized ones as `QuantizedWeight`s of numpy parts)."""
    one = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("one",)), P())
    c = source.config
    hold = jax.jit(lambda w: as_held(w, quantize, DTYPES[dtype]))
    for layer, names in [(None, global_shapes(c)), *((i, layer_shapes(c)) for i in range(c.n_layers))]:
        keys = {n if layer is None else f"{n}@{layer}": one for n in names}
        got = {k.partition("@")[0]: v for k, v in source.read(keys, DTYPES[dtype]).items()}
        if quantize is not None or any(isinstance(v, QuantizedWeight) for v in got.values()):
            got = hold(got)
        yield layer, jax.tree.map(np.asarray, got)


def export(source: WeightSource, out: Path, fmt: str = "lpjax", dtype: str | None = None, overwrite: bool = False,
           progress: Callable[[int, int], None] | None = None, quantize: QuantSpec | None = None) -> str | None:
    """Write `source` to `out` in `fmt`, cast to `dtype` (default: as stored), its matrices quantized as `quantize`
    says (lpjax format only; a quantized source stays quantized there, and is dequantized for an HF export). Returns
    a note for the user, if any."""
    if fmt not in FORMATS:
        raise LPJaxError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "hf" and quantize is not None:
        raise LPJaxError(f"{quantize.flags()}: a Hugging Face export holds plain weights; quantized weights are "
                         "written with --format lpjax")
    quantize = None if fmt == "hf" else resolve_quantize(source, quantize)
    dtype = dtype or source_dtype(source)
    if dtype not in DTYPES:
        raise LPJaxError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if source.directory is not None and out.resolve() == Path(source.directory).resolve():
        raise LPJaxError("--out must differ from the model directory")
    prepare_output_dir(out, overwrite)
    c = source.config
    hf_config = dict(source.hf_config or to_hf(c, dtype), torch_dtype=dtype, dtype=dtype)
    about = hf_config.pop(PLAN_KEY, None)  # what a fine-tune noted beside its plan (trained layers, loss)
    about = {k: v for k, v in about.items() if k != "lp"} if isinstance(about, dict) else {}
    items = source_items(source, dtype, quantize)
    trained_for = trained_plan(source) or ""
    if fmt == "hf":
        hf_config = with_plan(hf_config, trained_for, **dict(about, exported_from=source.description))
        write_hf(out, c, hf_config, items, np.dtype(DTYPES[dtype]), progress)
    else:
        if trained_for:
            hf_config = with_plan(hf_config, trained_for, **dict(about, converted_from=source.description))
        write_checkpoint(out, hf_config, items, dtype, f"converted from {source.description}", progress=progress,
                         total=c.n_layers + 1, quantize=quantize)
    if source.directory is not None:
        copy_tokenizer(Path(source.directory), out)
    notes = []
    if source.directory is None:
        notes.append("random weights have no tokenizer files: lpjax uses its byte-level tokenizer for them")
    if fmt == "hf" and trained_for:
        notes.append(f"these weights were fine-tuned for --lp {trained_for}: config.json records that plan, and "
                     "lpjax runs the directory under it unless --lp says otherwise (transformers runs the layers "
                     "sequentially)")
    return "; ".join(notes) or None
