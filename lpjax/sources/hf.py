"""Hugging Face Llama directories, read and written without torch.

Reading: every tensor of the directory's safetensors, checked against the weights the config implies (names,
shapes and layouts from `lpjax/schema.py`); each device's shard is sliced straight out of the memory-mapped files.
`HFNamedSource` is the part any source of HF-named tensors shares (a GGUF reader that renames its tensors to HF's
plugs in here). Writing (`write_hf`): an HF Llama directory transformers loads, from any source's canonical weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from lpjax.config import ModelConfig, read_hf_config
from lpjax.errors import LPJaxError
from lpjax.quantize import QuantizedWeight, part_sharding
from lpjax.schema import BY_NAME, canonical_shapes, weights
from lpjax.sources.safetensors import read_safetensors, safetensors_files, write_safetensors
from lpjax.weights import WeightSource

# Buffers some old checkpoints carry that are not weights (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFNamedSource(WeightSource):
    """A source whose tensors carry HF names: `index(tensors)` checks {HF name: lazy numpy array} against the
    config (every weight present at its shape, nothing unused) and keeps canonical views; `read` places them. A
    matrix may come quantized: a `QuantizedWeight` of HF-layout parts, values [out, in] and scales [out, groups]."""

    def index(self, tensors: dict[str, np.ndarray], where: str, name_of: Callable[[str], str] = str) -> None:
        """`name_of` gives a tensor's name as the user's file spells it, for the errors (a GGUF file's own)."""
        self.views: dict[str, np.ndarray] = {}
        expected = set()
        for key, shape in canonical_shapes(self.config).items():
            name, _, layer = key.partition("@")
            w = BY_NAME[name]
            hf_name = w.hf_key(int(layer) if layer else None)
            expected.add(hf_name)
            if hf_name not in tensors:
                raise LPJaxError(f"{where}: tensor {name_of(hf_name)} is missing")
            want = w.hf_shape(shape)
            if tuple(tensors[hf_name].shape) != want:
                got = tuple(tensors[hf_name].shape)
                raise LPJaxError(f"{where}: tensor {name_of(hf_name)} has shape {got}, expected {want}")
            t = tensors[hf_name]
            if isinstance(t, QuantizedWeight):  # every part in the canonical layout, groups along the input
                groups = (t.scale.shape[-1], *shape[1:])
                self.views[key] = QuantizedWeight(*(w.from_hf(p, shape if p is t.values else groups)
                                                    for p in t.parts))
            else:
                self.views[key] = w.from_hf(t, shape)
        if self.config.tied_embeddings:
            expected.add(BY_NAME["lm_head"].hf_key())  # some tied checkpoints store the shared matrix twice
        unused = sorted(n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
        if unused:
            raise LPJaxError(
                f"{where}: tensor {unused[0]} is not used by a Llama of this config.json"
                + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else "")
            )
        self.dtype = next((t.dtype for t in tensors.values() if not isinstance(t, QuantizedWeight)),
                          np.dtype(np.float32))

    def read(self, keys, dtype):
        out = {}
        for key, sharding in keys.items():
            view = self.views[key]
            if isinstance(view, QuantizedWeight):  # values as stored, scales in `dtype`
                out[key] = QuantizedWeight(*(_place(p, part_sharding(sharding, view.shape, p.shape),
                                                    None if p is view.values else dtype) for p in view.parts))
            else:
                out[key] = _place(view, sharding, dtype)
        return out


def _place(view, sharding, dtype) -> jax.Array:
    """A lazy view as a global array, each device's shard sliced out of it (cast to `dtype` unless None)."""
    def shard(idx):
        x = np.asarray(view[idx])
        return x if dtype is None else x.astype(dtype)

    return jax.make_array_from_callback(tuple(view.shape), sharding, shard)


class HFSource(HFNamedSource):
    """An HF directory: `config.json`, safetensors (one file or sharded with an index), tokenizer files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.config, self.hf_config = read_hf_config(directory)
        tensors: dict[str, np.ndarray] = {}
        for f in safetensors_files(directory):
            tensors.update(read_safetensors(f))
        self.index(tensors, str(directory))
        self.description = f"Hugging Face checkpoint {directory}"


WEIGHTS_FILE = "model.safetensors"


def write_hf(out: Path, config: ModelConfig, hf_config: dict, items, np_dtype: np.dtype,
             progress: Callable[[int, int], None] | None = None) -> None:
    """Write `items` ((layer or None for globals, that item's canonical numpy weights), the globals and every layer
    once, in any order) as an HF Llama directory's `model.safetensors` and `config.json` (tokenizer files are the
    caller's). Streams: one item in memory at a time."""
    shapes = {}
    for w in weights(config, per_layer=False):
        shapes[w.hf_key()] = (w.hf_shape(w.shape(config)), np_dtype)
    for i in range(config.n_layers):
        for w in weights(config, per_layer=True):
            shapes[w.hf_key(i)] = (w.hf_shape(w.shape(config)), np_dtype)
    total = config.n_layers + 1

    def tensors():
        for n, (layer, arrays) in enumerate(items):
            for name, array in arrays.items():
                w = BY_NAME[name]
                yield w.hf_key(layer), w.to_hf(np.asarray(array).astype(np_dtype))
            if progress:
                progress(n + 1, total)

    write_safetensors(out / WEIGHTS_FILE, shapes, tensors(), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
