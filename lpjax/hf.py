"""Reading Hugging Face Llama checkpoints without torch.

Safetensors files are parsed here (8-byte header length, JSON header, raw little-endian data) and memory-mapped, so
a tensor is a lazy numpy view: reading one device's shard touches only those bytes. `HF_NAMES` maps the canonical
per-layer weights (see `weights.py`) to HF tensor names and the transform from HF's [out, in] layout.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from lpjax.config import ModelConfig
from lpjax.errors import LPJaxError

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
# Buffers some old checkpoints carry that are not weights (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map one .safetensors file: name -> lazy numpy array."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise LPJaxError(f"{path}: not a readable safetensors file ({e.__class__.__name__}: {e})") from None
    out = {}
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise LPJaxError(f"{path}: tensor {name!r} has a malformed header entry or unsupported dtype") from None
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or base + end > buf.size:
            raise LPJaxError(f"{path}: tensor {name!r} is truncated or its header is inconsistent")
        out[name] = buf[base + begin : base + end].view(dtype).reshape(shape)
    return out


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LPJaxError(f"{index}: malformed index (expected a 'weight_map' object)") from None
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LPJaxError(f"{directory}: safetensors shard {missing[0]} listed in the index is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        hint = " (pytorch_model.bin is not read: re-save with safe_serialization=True)" if any(
            directory.glob("*.bin")) else ""
        raise LPJaxError(f"{directory}: no *.safetensors weights found{hint}")
    return files


# canonical name -> (HF name template, transform). Transforms turn HF's [out, in] matrices into lpjax layouts.
HF_NAMES: dict[str, tuple[str, str]] = {
    "embedding": ("model.embed_tokens.weight", "id"),
    "norm": ("model.norm.weight", "id"),
    "lm_head": ("lm_head.weight", "T"),
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "id"),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", "in_heads"),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", "in_heads"),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", "in_heads"),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", "T"),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", "heads"),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", "heads"),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", "heads"),
    "bo": ("model.layers.{i}.self_attn.o_proj.bias", "id"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "id"),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", "T"),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", "T"),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", "T"),
    "b_gate": ("model.layers.{i}.mlp.gate_proj.bias", "id"),
    "b_up": ("model.layers.{i}.mlp.up_proj.bias", "id"),
    "b_down": ("model.layers.{i}.mlp.down_proj.bias", "id"),
}


def hf_shape(name: str, shape: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    """The HF tensor shape that holds the canonical weight `name` of `shape`."""
    kind = HF_NAMES[name][1]
    if kind == "T":
        return shape[::-1]
    if kind == "in_heads":  # [D, n, hd] <- [n*hd, D]
        return (shape[1] * shape[2], shape[0])
    if kind == "heads":  # [n, hd] <- [n*hd]
        return (shape[0] * shape[1],)
    return shape


def to_canonical(name: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A lazy view of HF `tensor` in the canonical layout (numpy transposes and splits are views)."""
    kind = HF_NAMES[name][1]
    if kind == "T":
        return tensor.T
    if kind == "in_heads":
        return tensor.T.reshape(shape)
    return tensor.reshape(shape)


class HFCheckpoint:
    """All tensors of an HF directory, checked against the canonical weights the config implies."""

    def __init__(self, directory: Path, config: ModelConfig, canonical_shapes: dict[str, tuple[int, ...]]):
        tensors: dict[str, np.ndarray] = {}
        for f in safetensors_files(directory):
            tensors.update(read_safetensors(f))
        self.views: dict[str, np.ndarray] = {}
        expected = set()
        for key, shape in canonical_shapes.items():
            name, _, layer = key.partition("@")
            hf_name = HF_NAMES[name][0].format(i=layer)
            expected.add(hf_name)
            if hf_name not in tensors:
                raise LPJaxError(f"{directory}: tensor {hf_name} is missing")
            want = hf_shape(name, shape, config)
            if tuple(tensors[hf_name].shape) != want:
                raise LPJaxError(
                    f"{directory}: tensor {hf_name} has shape {tuple(tensors[hf_name].shape)}, expected {want}"
                )
            self.views[key] = to_canonical(name, tensors[hf_name], shape)
        if config.tied_embeddings:
            expected.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
        unused = sorted(n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
        if unused:
            raise LPJaxError(
                f"{directory}: tensor {unused[0]} is not used by a Llama of this config.json"
                + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else "")
            )
        self.dtype = next(iter(tensors.values())).dtype if tensors else np.dtype(np.float32)
