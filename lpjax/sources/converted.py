"""The converted lpjax format: canonical per-layer weights in Orbax, with config and tokenizer beside them.

    DIR/lpjax.json          format marker, dtype, layer count, provenance, and how matrices are quantized (if they are)
    DIR/config.json         the HF config (so every tool reads one config format)
    DIR/params/globals      Orbax checkpoint: embedding, norm, lm_head
    DIR/params/layer_0000   Orbax checkpoint: one layer's canonical weights (one per layer)
    DIR/tokenizer files     copied from the source

One checkpoint per layer keeps both writing and reading to one layer of host memory at a time, and lets a reader
restore each layer straight into the shardings its LP plan needs (plain per-layer weights: no plan is baked in).

A quantized checkpoint (`convert --quantize`) stores each quantized matrix as {values, scale[, offset]} (int8 or
int4 values, scales in the checkpoint's dtype) and records its `QuantSpec` in lpjax.json; it is read back quantized,
each part restored into the sharding its values imply (`quantize.part_sharding`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import numpy as np

from lpjax.config import read_hf_config
from lpjax.errors import LPJaxError, first_line
from lpjax.quantize import QuantizedWeight, QuantSpec, part_sharding
from lpjax.schema import global_shapes, layer_shapes
from lpjax.tokenizer import copy_tokenizer
from lpjax.weights import DTYPES, WeightSource

FORMAT = "lpjax-orbax-v1"
MARKER = "lpjax.json"


def is_converted(path: Path) -> bool:
    return (path / MARKER).is_file()


def _item(i: int | None) -> str:
    return "globals" if i is None else f"layer_{i:04d}"


def write_checkpoint(
    out: Path,
    hf_config: dict,
    weights: Iterable[tuple[int | None, dict[str, np.ndarray]]],
    dtype: str,
    provenance: str,
    tokenizer_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    total: int | None = None,
    quantize: QuantSpec | None = None,
) -> None:
    """Write `(layer or None for globals, canonical weights)` items as the converted format; quantized matrices
    (`QuantizedWeight`s, as `quantize` made them) as their parts."""
    import orbax.checkpoint as ocp  # here, not at import: open_source imports this module for every model

    checkpointer = ocp.StandardCheckpointer()
    (out / "params").mkdir(exist_ok=True)
    for n, (layer, arrays) in enumerate(weights):
        stored = {k: _parts(v) if isinstance(v, QuantizedWeight) else v for k, v in arrays.items()}
        checkpointer.save((out / "params" / _item(layer)).absolute(), stored)
        checkpointer.wait_until_finished()
        if progress and total:
            progress(n + 1, total)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    meta = {"format": FORMAT, "dtype": dtype, "n_layers": hf_config.get("num_hidden_layers"), "source": provenance}
    if quantize is not None:
        meta["quantize"] = str(quantize)
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


PARTS = ("values", "scale", "offset")


def _parts(qw: QuantizedWeight) -> dict:
    return {name: part for name, part in zip(PARTS, qw.parts)}


class OrbaxSource(WeightSource):
    """A converted directory: each layer's Orbax checkpoint restored straight into the requested shardings."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            meta = json.loads((directory / MARKER).read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise LPJaxError(f"{directory / MARKER}: unreadable ({e})") from None
        if meta.get("format") != FORMAT:
            raise LPJaxError(f"{directory}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
        self.meta = meta  # provenance; a fine-tune records the plan it was trained for under "training"
        self.config, self.hf_config = read_hf_config(directory)
        self.dtype = np.dtype(DTYPES.get(meta.get("dtype"), np.float32))
        try:
            self.quantized = QuantSpec.from_string(meta["quantize"]) if meta.get("quantize") else None
        except (LPJaxError, ValueError):
            raise LPJaxError(f"{directory / MARKER}: unknown quantization {meta['quantize']!r}") from None
        missing = [_item(i) for i in [None, *range(self.config.n_layers)]
                   if not (directory / "params" / _item(i)).is_dir()]
        if missing:
            raise LPJaxError(f"{directory}: checkpoint item params/{missing[0]} is missing")
        self.description = f"lpjax checkpoint {directory}"
        import orbax.checkpoint as ocp

        self._checkpointer = ocp.StandardCheckpointer()

    def read(self, keys, dtype):
        by_item: dict[str, dict] = {}
        for key, sharding in keys.items():
            name, _, layer = key.partition("@")
            shape = (layer_shapes if layer else global_shapes)(self.config)[name]
            by_item.setdefault(_item(int(layer) if layer else None), {})[name] = (key, shape, sharding)
        out = {}
        for item, wanted in by_item.items():
            path = (self.directory / "params" / item).absolute()
            stored = self._stored(path) if self.quantized is not None else {}
            abstract = {n: self._abstract(stored.get(n), shape, sh, dtype) for n, (_, shape, sh) in wanted.items()}
            try:
                restored = self._checkpointer.restore(path, abstract)
            except (ValueError, KeyError, FileNotFoundError) as e:
                raise LPJaxError(f"{self.directory}: params/{item} does not match config.json "
                                 f"({first_line(e)})") from None
            out.update({wanted[n][0]: QuantizedWeight(**v) if isinstance(v, dict) else v for n, v in restored.items()})
        return out

    def _stored(self, path: Path) -> dict:
        """What a quantized checkpoint's item holds: {name: {part: (shape, dtype)}} for its quantized matrices."""
        try:
            tree = self._checkpointer.metadata(path).item_metadata.tree
        except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
            raise LPJaxError(f"{self.directory}: {path.name} is unreadable ({first_line(e)})") from None
        return {n: {p: (tuple(m.shape), m.dtype) for p, m in parts.items()}
                for n, parts in tree.items() if isinstance(parts, dict)}

    @staticmethod
    def _abstract(parts: dict | None, shape, sharding, dtype):
        """What to restore one weight as: at `shape` in `dtype`, or a quantized matrix's parts (values as stored,
        scales in `dtype`), each in the sharding of its part."""
        if parts is None:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        return {p: jax.ShapeDtypeStruct(s, dt if p == "values" else dtype, sharding=part_sharding(sharding, shape, s))
                for p, (s, dt) in parts.items()}
