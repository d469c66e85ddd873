"""Every weight of the model, declared once.

A `Weight` is one canonical (plan-independent, checkpointed) tensor: its shape from the config, its logical axes,
its Hugging Face name and layout, its GGUF (llama.cpp) name, how it is initialised and whether AdamW decays it. A
`TreeParam` is one leaf of the model tree a plan assembles from them (fused, stacked per stage). Everything else is
derived from these two tables: shapes (`layer_shapes`, `global_shapes`, and the model's parameters:
`TreeParam.shape`), shardings (`sharding.ShardingRules`), the HF name map (`sources/hf.py`,
`sources/hf.py:write_hf`), the GGUF name map (`sources/gguf.py`), initialisation (`Weight.init`, a function of the
config: random weights, training, the model's own `init` and the PyTorch baselines draw from it), the weight-decay
mask (`decayed_paths`) and which matrices `--quantize` quantizes (`Weight.quantized`). Adding a weight is one
row here (and a `TreeParam` row, unless an existing leaf fuses it), plus its use in the model's math (`model.py`
takes a leaf by path: `_param(module, "attn/wqkv")`) and in the fusion (`weights.assemble_stage`).

HF layouts: `id` (same array), `T` (HF stores [out, in]: transposed), `in_heads` (HF [n*hd, D] <-> [D, n, hd]),
`heads` (HF [n*hd] <-> [n, hd]).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from lpjax.config import ModelConfig

INIT_STD = 0.02  # every matrix's N(0, std); the residual-writing ones are scaled down by depth


@dataclasses.dataclass(frozen=True)
class Init:
    """A weight's initial values: draws of N(0, std) when `std` > 0, else `fill` everywhere."""

    fill: float = 0.0
    std: float = 0.0


def ones(config: ModelConfig) -> Init:
    """Norm scales: the identity."""
    return Init(fill=1.0)


def zeros(config: ModelConfig) -> Init:
    """Biases."""
    return Init()


def normal(config: ModelConfig) -> Init:
    """Matrices that read the residual stream, and the embedding."""
    return Init(std=INIT_STD)


def residual(config: ModelConfig) -> Init:
    """Projections that write the residual stream (wo, w_down), scaled by 1/sqrt(2 * layers) as in GPT-2, so the
    stream's variance does not grow with depth when training from scratch."""
    return Init(std=INIT_STD / math.sqrt(2 * config.n_layers))


def _always(config: ModelConfig) -> bool:
    return True


def _attention_bias(config: ModelConfig) -> bool:
    return config.attention_bias


def _mlp_bias(config: ModelConfig) -> bool:
    return config.mlp_bias


def _untied(config: ModelConfig) -> bool:
    return not config.tied_embeddings


@dataclasses.dataclass(frozen=True)
class Weight:
    """One canonical weight. Layer weights are keyed `name@i`, globals `name`."""

    name: str
    per_layer: bool
    shape: Callable[[ModelConfig], tuple[int, ...]]
    axes: tuple[str | None, ...]  # logical axes (sharding.ShardingRules maps them to mesh axes)
    hf_name: str  # `{i}` is the layer
    gguf_name: str  # the same tensor's name in a GGUF file (llama.cpp's `llama` architecture)
    hf_layout: str  # id | T | in_heads | heads
    init: Callable[[ModelConfig], Init]  # ones | zeros | normal | residual
    decayed: bool = False  # AdamW weight decay (matrices only)
    present: Callable[[ModelConfig], bool] = _always
    quantized: bool = False  # a matrix `--quantize` quantizes (lpjax/quantize.py; its input axis is the first)

    def key(self, layer: int | None = None) -> str:
        return self.name if layer is None else f"{self.name}@{layer}"

    def hf_key(self, layer: int | None = None) -> str:
        return self.hf_name.format(i=layer)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor shape that holds this weight at canonical `shape`."""
        if self.hf_layout == "T":
            return shape[::-1]
        if self.hf_layout == "in_heads":  # [D, n, hd] <- [n*hd, D]
            return (shape[1] * shape[2], shape[0])
        if self.hf_layout == "heads":  # [n, hd] <- [n*hd]
            return (shape[0] * shape[1],)
        return shape

    def from_hf(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A lazy view of HF `tensor` in the canonical layout (numpy transposes and reshapes are views)."""
        if self.hf_layout == "T":
            return tensor.T
        if self.hf_layout == "in_heads":
            return tensor.T.reshape(shape)
        return tensor.reshape(shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """Inverse of `from_hf`: the canonical array in HF's layout (contiguous, ready to write)."""
        if self.hf_layout == "T":
            out = array.T
        elif self.hf_layout == "in_heads":
            out = array.reshape(array.shape[0], -1).T
        else:
            out = array.reshape(self.hf_shape(array.shape))
        return np.ascontiguousarray(out)


def _w(name, per_layer, shape, axes, names, layout, init, decayed=False, present=_always, quantized=False) -> Weight:
    """One row; `names` is (HF name, GGUF name)."""
    hf_name, gguf_name = names
    return Weight(name, per_layer, shape, axes, hf_name, gguf_name, layout, init, decayed, present, quantized)


_L, _B = "model.layers.{i}.", "blk.{i}."  # HF and GGUF (llama.cpp) prefixes of a layer's names
WEIGHTS: tuple[Weight, ...] = (
    _w("embedding", False, lambda c: (c.vocab_size, c.dim), ("vocab", None),
       ("model.embed_tokens.weight", "token_embd.weight"), "id", normal, decayed=True),
    _w("norm", False, lambda c: (c.dim,), (None,), ("model.norm.weight", "output_norm.weight"), "id", ones),
    _w("lm_head", False, lambda c: (c.dim, c.vocab_size), (None, "vocab"), ("lm_head.weight", "output.weight"), "T",
       normal, decayed=True, present=_untied, quantized=True),
    _w("attn_norm", True, lambda c: (c.dim,), (None,), (_L + "input_layernorm.weight", _B + "attn_norm.weight"),
       "id", ones),
    _w("wq", True, lambda c: (c.dim, c.n_heads, c.head_dim), (None, "heads", None),
       (_L + "self_attn.q_proj.weight", _B + "attn_q.weight"), "in_heads", normal, decayed=True, quantized=True),
    _w("wk", True, lambda c: (c.dim, c.n_kv_heads, c.head_dim), (None, "kv_heads", None),
       (_L + "self_attn.k_proj.weight", _B + "attn_k.weight"), "in_heads", normal, decayed=True, quantized=True),
    _w("wv", True, lambda c: (c.dim, c.n_kv_heads, c.head_dim), (None, "kv_heads", None),
       (_L + "self_attn.v_proj.weight", _B + "attn_v.weight"), "in_heads", normal, decayed=True, quantized=True),
    _w("wo", True, lambda c: (c.n_heads * c.head_dim, c.dim), ("heads", None),
       (_L + "self_attn.o_proj.weight", _B + "attn_output.weight"), "T", residual, decayed=True, quantized=True),
    _w("bq", True, lambda c: (c.n_heads, c.head_dim), ("heads", None),
       (_L + "self_attn.q_proj.bias", _B + "attn_q.bias"), "heads", zeros, present=_attention_bias),
    _w("bk", True, lambda c: (c.n_kv_heads, c.head_dim), ("kv_heads", None),
       (_L + "self_attn.k_proj.bias", _B + "attn_k.bias"), "heads", zeros, present=_attention_bias),
    _w("bv", True, lambda c: (c.n_kv_heads, c.head_dim), ("kv_heads", None),
       (_L + "self_attn.v_proj.bias", _B + "attn_v.bias"), "heads", zeros, present=_attention_bias),
    _w("bo", True, lambda c: (c.dim,), (None,), (_L + "self_attn.o_proj.bias", _B + "attn_output.bias"), "id",
       zeros, present=_attention_bias),
    _w("mlp_norm", True, lambda c: (c.dim,), (None,),
       (_L + "post_attention_layernorm.weight", _B + "ffn_norm.weight"), "id", ones),
    _w("w_gate", True, lambda c: (c.dim, c.ffn_dim), (None, "mlp"),
       (_L + "mlp.gate_proj.weight", _B + "ffn_gate.weight"), "T", normal, decayed=True, quantized=True),
    _w("w_up", True, lambda c: (c.dim, c.ffn_dim), (None, "mlp"), (_L + "mlp.up_proj.weight", _B + "ffn_up.weight"),
       "T", normal, decayed=True, quantized=True),
    _w("w_down", True, lambda c: (c.ffn_dim, c.dim), ("mlp", None),
       (_L + "mlp.down_proj.weight", _B + "ffn_down.weight"), "T", residual, decayed=True, quantized=True),
    _w("b_gate", True, lambda c: (c.ffn_dim,), ("mlp",), (_L + "mlp.gate_proj.bias", _B + "ffn_gate.bias"), "id",
       zeros, present=_mlp_bias),
    _w("b_up", True, lambda c: (c.ffn_dim,), ("mlp",), (_L + "mlp.up_proj.bias", _B + "ffn_up.bias"), "id", zeros,
       present=_mlp_bias),
    _w("b_down", True, lambda c: (c.dim,), (None,), (_L + "mlp.down_proj.bias", _B + "ffn_down.bias"), "id", zeros,
       present=_mlp_bias),
)
BY_NAME: dict[str, Weight] = {w.name: w for w in WEIGHTS}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much of the model one module holds: attention heads, KV heads (as stored, repeats included), MLP width and
    padded vocabulary; per device inside `shard_map`, else the whole model's. Fields a module does not use stay 0."""

    heads: int = 0
    kv_heads: int = 0
    ffn: int = 0
    vocab: int = 0


@dataclasses.dataclass(frozen=True)
class TreeParam:
    """One leaf of the model tree: its path inside a stage (`attn/wqkv`) or the model (`embed/embedding`), its
    logical axes (a stage's lead with the stack axis), the canonical weights it is made of, and its shape at given
    `Sizes`: a stage leaf's shape for one layer (the tree stacks the stage's layers in front), a global's whole."""

    path: str
    axes: tuple[str | None, ...]
    made_of: tuple[str, ...]
    shape: Callable[[ModelConfig, Sizes], tuple[int, ...]]

    @property
    def decayed(self) -> bool:
        return any(BY_NAME[n].decayed for n in self.made_of)

    @property
    def quantized(self) -> bool:
        return all(BY_NAME[n].quantized for n in self.made_of)

    @property
    def init(self) -> Callable[[ModelConfig], Init]:
        (init,) = {BY_NAME[n].init for n in self.made_of}  # a leaf only fuses weights initialised alike
        return init

    def present(self, config: ModelConfig) -> bool:
        return all(BY_NAME[n].present(config) for n in self.made_of)


def _qkv(s: Sizes) -> tuple[int, int]:
    """(KV heads, their groups: G query heads + key + value) of the fused q/k/v."""
    return s.kv_heads, s.heads // s.kv_heads + 2


STAGE_PARAMS: tuple[TreeParam, ...] = (
    TreeParam("attn/norm", ("stack", None), ("attn_norm",), lambda c, s: (c.dim,)),
    TreeParam("attn/wqkv", ("stack", None, "kv_heads", None, None), ("wq", "wk", "wv"),  # [S, D, KV, G+2, hd]
              lambda c, s: (c.dim, *_qkv(s), c.head_dim)),
    TreeParam("attn/bqkv", ("stack", "kv_heads", None, None), ("bq", "bk", "bv"),
              lambda c, s: (*_qkv(s), c.head_dim)),
    TreeParam("attn/wo", ("stack", "heads", None), ("wo",),  # [S, H*hd, D]: rows are whole heads, split like them
              lambda c, s: (s.heads * c.head_dim, c.dim)),
    TreeParam("mlp/norm", ("stack", None), ("mlp_norm",), lambda c, s: (c.dim,)),
    TreeParam("mlp/w_gate_up", ("stack", None, None, "mlp"), ("w_gate", "w_up"),  # [S, D, 2, F]
              lambda c, s: (c.dim, 2, s.ffn)),
    TreeParam("mlp/b_gate_up", ("stack", None, "mlp"), ("b_gate", "b_up"), lambda c, s: (2, s.ffn)),
    TreeParam("mlp/w_down", ("stack", "mlp", None), ("w_down",), lambda c, s: (s.ffn, c.dim)),
    # Output biases are added once, after the all-reduce, so every device holds all of them.
    TreeParam("attn_out_bias", (None, None), ("bo",), lambda c, s: (c.dim,)),
    TreeParam("mlp_out_bias", (None, None), ("b_down",), lambda c, s: (c.dim,)),
)
GLOBAL_PARAMS: tuple[TreeParam, ...] = (
    TreeParam("embed/embedding", ("vocab", None), ("embedding",), lambda c, s: (s.vocab, c.dim)),
    TreeParam("lm_head", (None, "vocab"), ("lm_head",), lambda c, s: (c.dim, s.vocab)),
    TreeParam("norm/scale", (None,), ("norm",), lambda c, s: (c.dim,)),
)
BY_PATH: dict[str, TreeParam] = {p.path: p for p in (*STAGE_PARAMS, *GLOBAL_PARAMS)}


def weights(config: ModelConfig, per_layer: bool) -> tuple[Weight, ...]:
    """The weights this config has: one layer's (`per_layer`) or the globals."""
    return tuple(w for w in WEIGHTS if w.per_layer == per_layer and w.present(config))


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical shapes of one layer's weights."""
    return {w.name: w.shape(config) for w in weights(config, True)}


def global_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {w.name: w.shape(config) for w in weights(config, False)}


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical weight of the model, keyed `name` or `name@layer`."""
    out = dict(global_shapes(config))
    for i in range(config.n_layers):
        out.update({f"{n}@{i}": s for n, s in layer_shapes(config).items()})
    return out


def decayed_paths() -> frozenset[str]:
    """Last path components of the model-tree leaves AdamW decays (the matrices; norms and biases are not)."""
    return frozenset(p.path.rpartition("/")[2] for p in (*STAGE_PARAMS, *GLOBAL_PARAMS) if p.decayed)
