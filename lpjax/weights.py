"""Weights: how a plan turns canonical per-layer weights into the model tree on a mesh, and back.

Canonical weights (plan-independent, what checkpoints store) are declared in `lpjax/schema.py`: globals
`embedding`, `norm`, `lm_head` (untied only), and per layer `wq`, `wk`, `wv`, `wo`, `w_gate`, `w_up`, `w_down`, norms
and optional biases. Keys are `name` for globals and `name@i` for layer i.

A `WeightSource` (lpjax/sources/) hands out one layer at a time, already placed on the devices that need it;
`load_params` then stacks each stage under `jit` with the stage's output sharding, so pairs are restacked on device
and no model is ever whole in host memory or on one device. `disassemble_*` invert the assembly exactly (training
and export write through them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.config import ModelConfig
from lpjax.schema import global_shapes, layer_shapes
from lpjax.sharding import RULES, Layout, StageLayout

# The dtypes weights can be loaded, computed and saved in, by the name every `--dtype` flag takes (its choices).
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


class WeightSource:
    """Where weights come from (lpjax/sources/): hands out canonical weights, already placed with the given
    shardings. `read({key: sharding}, dtype)` -> {key: array}; keys are `name` (globals) or `name@layer`."""

    config: ModelConfig
    hf_config: dict | None = None  # the HF config dict the model came with (None: made from `config`)
    description: str
    directory: Path | None = None  # where config and tokenizer live (None: random weights)
    dtype: np.dtype | None = None  # what the checkpoint stores (None: random weights)

    def read(self, keys: dict[str, NamedSharding], dtype) -> dict[str, jax.Array]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# Placement


def _layer_shardings(s: StageLayout, mesh: Mesh, config: ModelConfig) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, RULES.layer_spec(name, s)) for name in layer_shapes(config)}


def _fuse_qkv(w: dict[str, jax.Array], repeat: int, bias: bool = False) -> jax.Array:
    """[D, H, hd] q and [D, K, hd] k/v (or their [.., hd] biases) -> [D, K*r, G/r + 2, hd]: per (repeated) KV head,
    its query heads, its key, its value."""
    q, k, v = (w["bq"], w["bk"], w["bv"]) if bias else (w["wq"], w["wk"], w["wv"])
    lead = q.shape[:-2]
    k, v = jnp.repeat(k, repeat, axis=-2), jnp.repeat(v, repeat, axis=-2)
    kv = k.shape[-2]
    q = q.reshape(*lead, kv, q.shape[-2] // kv, q.shape[-1])
    return jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)


def assemble_stage(s: StageLayout, config: ModelConfig, layers: list[dict[str, jax.Array]]) -> dict:
    """The stage's model-tree parameters from its layers' canonical weights: fused, KV heads repeated, stacked."""
    stack = lambda f: jnp.stack([f(w) for w in layers])  # noqa: E731
    attn = {"norm": stack(lambda w: w["attn_norm"]), "wqkv": stack(lambda w: _fuse_qkv(w, s.kv_repeat)),
            "wo": stack(lambda w: w["wo"])}
    mlp = {"norm": stack(lambda w: w["mlp_norm"]), "w_gate_up": stack(lambda w: jnp.stack([w["w_gate"], w["w_up"]], 1)),
           "w_down": stack(lambda w: w["w_down"])}
    tree = {"attn": attn, "mlp": mlp}
    if config.attention_bias:
        attn["bqkv"] = stack(lambda w: _fuse_qkv(w, s.kv_repeat, bias=True))
        tree["attn_out_bias"] = stack(lambda w: w["bo"])
    if config.mlp_bias:
        mlp["b_gate_up"] = stack(lambda w: jnp.stack([w["b_gate"], w["b_up"]]))
        tree["mlp_out_bias"] = stack(lambda w: w["b_down"])
    return tree


def assemble_globals(layout: Layout, g: dict[str, jax.Array]) -> dict:
    pad = layout.vocab_padded - layout.config.vocab_size
    tree = {"embed": {"embedding": jnp.pad(g["embedding"], ((0, pad), (0, 0)))}, "norm": {"scale": g["norm"]}}
    if "lm_head" in g:
        tree["lm_head"] = jnp.pad(g["lm_head"], ((0, 0), (0, pad)))
    return tree


def _split_qkv(fused, repeat: int, heads: int):
    """Inverse of `_fuse_qkv`: [.., K*r, G/r + 2, hd] -> q [.., H, hd], k/v [.., K, hd] (one copy of each repeated
    KV head: the copies are equal)."""
    groups = fused.shape[-2] - 2
    q = fused[..., :groups, :].reshape(*fused.shape[:-3], heads, fused.shape[-1])
    return q, fused[..., ::repeat, groups, :], fused[..., ::repeat, groups + 1, :]


def disassemble_stage(s: StageLayout, config: ModelConfig, tree: dict) -> list[dict]:
    """Inverse of `assemble_stage`: the canonical weights of each of the stage's layers (in `s.stage.layers` order)
    from its model-tree parameters. Exact (only slicing and reshaping), for jax or numpy arrays alike; training
    writes its checkpoints through it."""
    attn, mlp = tree["attn"], tree["mlp"]
    layers = []
    for j in range(s.stack):
        q, k, v = _split_qkv(attn["wqkv"][j], s.kv_repeat, config.n_heads)
        w = {"attn_norm": attn["norm"][j], "wq": q, "wk": k, "wv": v, "wo": attn["wo"][j],
             "mlp_norm": mlp["norm"][j], "w_gate": mlp["w_gate_up"][j][:, 0], "w_up": mlp["w_gate_up"][j][:, 1],
             "w_down": mlp["w_down"][j]}
        if config.attention_bias:
            w["bq"], w["bk"], w["bv"] = _split_qkv(attn["bqkv"][j], s.kv_repeat, config.n_heads)
            w["bo"] = tree["attn_out_bias"][j]
        if config.mlp_bias:
            w["b_gate"], w["b_up"] = mlp["b_gate_up"][j][0], mlp["b_gate_up"][j][1]
            w["b_down"] = tree["mlp_out_bias"][j]
        layers.append(w)
    return layers


def disassemble_globals(layout: Layout, tree: dict) -> dict:
    """Inverse of `assemble_globals`: the canonical globals, vocabulary padding dropped."""
    V = layout.config.vocab_size
    g = {"embedding": tree["embed"]["embedding"][:V], "norm": tree["norm"]["scale"]}
    if "lm_head" in tree:
        g["lm_head"] = tree["lm_head"][:, :V]
    return g


def _global_shardings(layout: Layout, mesh: Mesh) -> dict[str, NamedSharding]:
    # Vocabulary-split when the real vocabulary divides; otherwise replicated until padded under jit.
    split = layout.config.vocab_size % layout.n_devices == 0
    vocab = RULES.vocab if split else None
    out = {"embedding": NamedSharding(mesh, P(vocab, None)), "norm": NamedSharding(mesh, P())}
    if not layout.config.tied_embeddings:
        out["lm_head"] = NamedSharding(mesh, P(None, vocab))
    return out


def abstract_params(layout: Layout, dtype) -> dict:
    """Shapes and dtypes of the model tree for `layout` (global sizes)."""
    c = layout.config
    layer = {k: jax.ShapeDtypeStruct(v, dtype) for k, v in layer_shapes(c).items()}
    g = {k: jax.ShapeDtypeStruct(v, dtype) for k, v in global_shapes(c).items()}
    tree = jax.eval_shape(lambda g: assemble_globals(layout, g), g)
    for s in layout.stages:
        tree[s.name] = jax.eval_shape(lambda ls, s=s: assemble_stage(s, c, ls), [layer] * s.stack)
    return tree


def param_shardings(layout: Layout, mesh: Mesh, dtype) -> dict:
    specs = RULES.param_specs(abstract_params(layout, dtype), layout)
    return jax.tree.map(lambda sp: NamedSharding(mesh, sp), specs, is_leaf=lambda x: isinstance(x, P))


def load_params(source: WeightSource, layout: Layout, mesh: Mesh, dtype,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Read `source` stage by stage into the model tree of `layout`, sharded over `mesh`."""
    c = layout.config
    targets = param_shardings(layout, mesh, dtype)
    g = source.read(_global_shardings(layout, mesh), dtype)
    g_targets = {k: targets[k] for k in ("embed", "norm", "lm_head") if k in targets}
    params = jax.jit(lambda g: assemble_globals(layout, g), out_shardings=g_targets)(g)
    del g
    assemblers: dict = {}
    for n, s in enumerate(layout.stages):
        shardings = _layer_shardings(s, mesh, c)
        layers = []
        for i in s.stage.layers:
            got = source.read({f"{k}@{i}": sh for k, sh in shardings.items()}, dtype)
            layers.append({k.partition("@")[0]: v for k, v in got.items()})
        kind = (s.stack, s.kv_repeat)
        if kind not in assemblers:
            assemblers[kind] = jax.jit(lambda ls, s=s: assemble_stage(s, c, ls), out_shardings=targets[s.name])
        params[s.name] = assemblers[kind](layers)
        del layers
        if progress:
            progress(n + 1, len(layout.stages))
    return params


def source_dtype(source: WeightSource) -> str:
    """The dtype a checkpoint was saved in, as a DTYPES key (bfloat16 for random weights, float32 for others)."""
    if source.dtype is None:
        return "bfloat16"
    name = np.dtype(source.dtype).name
    return name if name in DTYPES else "float32"


def canonical_layers(layout, params: dict) -> tuple[dict, dict[int, dict]]:
    """(globals, {layer: weights}): the canonical weights of a model tree."""
    layers = {}
    for s in layout.stages:
        layers.update(zip(s.stage.layers, disassemble_stage(s, layout.config, params[s.name])))
    return disassemble_globals(layout, params), layers


def retarget(params: dict, layout, target) -> dict:
    """The same weights as a model tree of another plan's layout."""
    g, layers = canonical_layers(layout, params)
    out = assemble_globals(target, g)
    for s in target.stages:
        out[s.name] = assemble_stage(s, target.config, [layers[i] for i in s.stage.layers])
    return out


def canonical_items(layout, params: dict, dtype: str):
    """(layer or None, canonical weights as numpy in `dtype`) for every item of the converted format."""
    np_dtype = np.dtype(DTYPES[dtype])
    g, layers = canonical_layers(layout, params)
    yield None, {k: np.asarray(v).astype(np_dtype) for k, v in g.items()}
    for i in sorted(layers):
        yield i, {k: np.asarray(v).astype(np_dtype) for k, v in layers[i].items()}
