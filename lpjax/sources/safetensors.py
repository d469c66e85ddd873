"""Safetensors without torch: read (memory-mapped, lazy) and write (streamed, one tensor in memory at a time).

The format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets), raw
little-endian data. Reading maps the file, so a tensor is a lazy numpy view and one device's shard touches only
those bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from lpjax.errors import LPJaxError

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


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




def write_safetensors(path: Path, shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                      tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name, array; any order), announced up front in `shapes` (name -> (shape, dtype)), as one
    safetensors file, streaming: only the tensor being written is in memory. Written aside, then renamed into place."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    base = 8 + len(blob)
    written = set()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(base + offset)
        for name, array in tensors:
            shape, dtype = shapes[name]
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: {array.shape} {array.dtype} written, {shape} {dtype} announced")
            f.seek(base + header[name]["data_offsets"][0])
            f.write(np.ascontiguousarray(array).tobytes())
            written.add(name)
    if written != set(shapes):
        tmp.unlink()
        raise ValueError(f"safetensors {path.name}: {sorted(set(shapes) - written)[:3]} announced but not written")
    tmp.replace(path)
