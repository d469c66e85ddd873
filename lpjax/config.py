"""Model configuration: what a Llama-family checkpoint is, read from a Hugging Face `config.json`.

One frozen dataclass, `ModelConfig`, holds every number the model code needs. `from_hf` validates an HF config dict
and explains in one line what it cannot run; `PRESETS` gives real model shapes for random-weight benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lpjax.errors import LPJaxError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `llama3` (Llama 3.1/3.2) or `linear` (position interpolation)."""

    kind: str  # "llama3" | "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    ffn_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tied_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "dim", "ffn_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise LPJaxError(f"model config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise LPJaxError(
                f"model config: {self.n_heads} attention heads are not a multiple of {self.n_kv_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise LPJaxError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def n_params(self) -> int:
        """Number of weights (embedding and LM head counted separately unless tied)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        layer = attn + mlp + 2 * self.dim
        head = 0 if self.tied_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * layer + self.dim + head

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rope_scaling(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read RoPE settings from either the transformers<5 keys (`rope_theta`, `rope_scaling`) or the v5 key
    (`rope_parameters`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in ("default", None):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        try:
            return theta, RopeScaling(
                kind="llama3",
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise LPJaxError(f"model config: llama3 rope scaling lacks {e.args[0]!r}") from None
    raise LPJaxError(f"model config: rope scaling of type {kind!r} is not supported (supported: llama3, linear)")


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Validate an HF Llama config dict and turn it into a `ModelConfig`."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise LPJaxError(f"model config: model_type is {model_type!r}; lpjax runs Llama-family models ('llama')")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LPJaxError(f"model config: hidden_act {act!r} is not supported (Llama uses 'silu')")
    try:
        dim = int(hf["hidden_size"])
        n_heads = int(hf["num_attention_heads"])
        raw = dict(
            vocab_size=int(hf["vocab_size"]),
            dim=dim,
            ffn_dim=int(hf["intermediate_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or (dim // n_heads if n_heads else 0)),
        )
    except KeyError as e:
        raise LPJaxError(f"model config: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise LPJaxError(f"model config: malformed value ({e})") from None
    if hf.get("head_dim") is None and raw["head_dim"] * n_heads != dim:
        raise LPJaxError(
            f"model config: hidden_size {dim} is not divisible by {n_heads} heads and no head_dim is given")
    theta, scaling = _rope_scaling(hf)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    return ModelConfig(
        **raw,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def to_hf(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """The inverse of `from_hf`: a Hugging Face `LlamaConfig` dict for `config` (transformers loads it, every lpjax
    tool reads it back as the same config), for models with no HF config of their own (trained, random)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = config.rope_scaling
    if scaling is not None:
        rope = dict(rope, rope_type=scaling.kind, factor=scaling.factor)
        if scaling.kind == "llama3":
            rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                        original_max_position_embeddings=scaling.original_max_position_embeddings)
    extra = {} if scaling is None else {"rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}}
    return extra | {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": config.dim, "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tied_embeddings,
        "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias, "initializer_range": 0.02,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else list(config.eos_token_ids),
        "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
    }


PLAN_KEY = "lpjax"  # config.json's key for lpjax's notes on a model: "lp", the LP plan its weights were trained for


def with_plan(hf: dict[str, Any], lp: str, **notes: Any) -> dict[str, Any]:
    """`hf` recording, under PLAN_KEY, the LP plan `lp` a fine-tune's weights were trained for ('' for none) and
    `notes` about it. transformers ignores the key (and runs the layers one after the other); lpjax runs the model
    under that plan when no --lp is given."""
    return dict(hf, **{PLAN_KEY: dict(notes, lp=lp)})


def recorded_plan(hf: dict[str, Any]) -> str | None:
    """The LP plan `with_plan` recorded in `hf`, or None (any other model)."""
    notes = hf.get(PLAN_KEY)
    lp = notes.get("lp") if isinstance(notes, dict) else None
    return lp if isinstance(lp, str) else None


def read_hf_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read and validate `DIR/config.json`; return the config and the raw dict."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise LPJaxError(f"{directory}: no config.json (not a Hugging Face or lpjax model directory)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LPJaxError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(hf, dict):
        raise LPJaxError(f"{path}: expected a JSON object")
    return from_hf(hf), hf


def _llama3_rope(factor: float, original: int) -> RopeScaling:
    return RopeScaling("llama3", factor, 1.0, 4.0, original)


# Real shapes for random-weight benchmarks and demos (`--model random:NAME`).
PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(
        vocab_size=32000, dim=4096, ffn_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256, dim=4096, ffn_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192, bos_token_id=128000, eos_token_ids=(128001,),
    ),
    "llama3.2-3b": ModelConfig(
        vocab_size=128256, dim=3072, ffn_dim=8192, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128,
        norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_llama3_rope(32.0, 8192), max_seq_len=131072,
        tied_embeddings=True, bos_token_id=128000, eos_token_ids=(128001,),
    ),
    # SmolLM2-135M-Instruct's shape (`--model smollm2` runs its real weights): for timing it on accelerators.
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, ffn_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tied_embeddings=True, bos_token_id=1,
        eos_token_ids=(2,),
    ),
    # Byte-level vocabulary (256 bytes + BOS/EOS/PAD) so the embedded byte tokenizer covers it.
    "tiny": ModelConfig(
        vocab_size=264, dim=128, ffn_dim=352, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=16,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048, bos_token_id=256, eos_token_ids=(257,),
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise LPJaxError(f"unknown preset random:{name} (known: {', '.join('random:' + p for p in PRESETS)})")
    return PRESETS[name]


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
