"""Weights: how a plan turns canonical per-layer weights into the model tree on a mesh, and back.

Canonical weights (plan-independent, what checkpoints store) are declared in `lpjax/schema.py`: globals
`embedding`, `norm`, `lm_head` (untied only), and per layer `wq`, `wk`, `wv`, `wo`, `w_gate`, `w_up`, `w_down`, norms
and optional biases. Keys are `name` for globals and `name@i` for layer i.

A `WeightSource` (lpjax/sources/) hands out one layer at a time, already placed on the devices that need it;
`load_params` then stacks each stage under `jit` with the stage's output sharding, so pairs are restacked on device
and no model is ever whole in host memory or on one device. `disassemble_*` invert the assembly exactly (training
and export write through them; plain weights only).

Under `--quantize` (a `quantize.QuantSpec`) the matrices the schema marks `quantized` are quantized as each stage
is assembled, on its devices (`as_held`), so only one stage is ever held unquantized; a source whose checkpoint
stores them quantized (`WeightSource.quantized`: a converted quantized checkpoint, a GGUF file read with
`--quantize gguf`) hands them over as `quantize.QuantizedWeight`s already. Fusing and stacking treat every part of a
quantized matrix alike.
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
from lpjax.errors import LPJaxError
from lpjax.quantize import QuantizedWeight, QuantSpec, dequantize, int4_storage, quantize
from lpjax.schema import BY_NAME, STAGE_PARAMS, global_shapes, layer_shapes
from lpjax.sharding import RULES, Layout, StageLayout, named

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
    quantized: QuantSpec | None = None  # how it stores its matrices, when it hands them over quantized

    def read(self, keys: dict[str, NamedSharding], dtype) -> dict[str, jax.Array]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# Placement


def _layer_shardings(s: StageLayout, mesh: Mesh, config: ModelConfig) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, RULES.layer_spec(name, s)) for name in layer_shapes(config)}


def as_held(weights: dict, spec: QuantSpec | None, dtype, int4=jnp.int4) -> dict:
    """Canonical weights (one layer's, or the globals) as the model holds them: under an int8/int4 `spec` the
    matrices the schema marks `quantized` quantized, scales in `dtype`; quantized ones a source handed over kept
    (their scales in `dtype`), or without a spec dequantized to `dtype`; everything else as it is. int4 values are
    held as `int4` (`quantize.int4_storage`)."""
    out = {}
    for name, w in weights.items():
        if spec is not None and spec.kind != "gguf" and BY_NAME[name].quantized and not isinstance(w, QuantizedWeight):
            w = quantize(w, spec, dtype)
        if isinstance(w, QuantizedWeight):
            if spec is None:
                w = dequantize(w, dtype)
            else:
                values = w.values.astype(int4) if w.values.dtype == jnp.int4 else w.values
                w = w.replace(values=values, scale=w.scale.astype(dtype),
                              offset=None if w.offset is None else w.offset.astype(dtype))
        out[name] = w
    return out


def _uniform(layers: list[dict]) -> list[dict]:
    """The layers with the weights of each fused and stacked model-tree leaf either all quantized alike or all plain:
    a GGUF file may mix types (Q4_0 beside Q6_K), and then the leaf's quantized members are dequantized too."""
    layers = [dict(w) for w in layers]
    for p in STAGE_PARAMS:
        members = [(w, n) for w in layers for n in p.made_of if n in w]
        schemes = {w[n].scheme() if isinstance(w[n], QuantizedWeight) else None for w, n in members}
        if len(schemes) > 1:
            for w, n in members:
                if isinstance(w[n], QuantizedWeight):
                    w[n] = dequantize(w[n], w[n].scale.dtype)
    return layers


def _fuse_qkv(w: dict[str, jax.Array], repeat: int, bias: bool = False):
    """[D, H, hd] q and [D, K, hd] k/v (or their [.., hd] biases) -> [D, K*r, G/r + 2, hd]: per (repeated) KV head,
    its query heads, its key, its value. Quantized, each part alike (the fusion only moves output columns)."""
    def fuse(q, k, v):
        lead = q.shape[:-2]
        k, v = jnp.repeat(k, repeat, axis=-2), jnp.repeat(v, repeat, axis=-2)
        kv = k.shape[-2]
        q = q.reshape(*lead, kv, q.shape[-2] // kv, q.shape[-1])
        return jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)

    return jax.tree.map(fuse, *((w["bq"], w["bk"], w["bv"]) if bias else (w["wq"], w["wk"], w["wv"])))


def assemble_stage(s: StageLayout, config: ModelConfig, layers: list[dict[str, jax.Array]]) -> dict:
    """The stage's model-tree parameters from its layers' canonical weights: fused, KV heads repeated, stacked."""
    layers = _uniform(layers)
    stack = lambda f: jax.tree.map(lambda *xs: jnp.stack(xs), *[f(w) for w in layers])  # noqa: E731
    gate_up = lambda w: jax.tree.map(lambda g, u: jnp.stack([g, u], 1), w["w_gate"], w["w_up"])  # noqa: E731
    attn = {"norm": stack(lambda w: w["attn_norm"]), "wqkv": stack(lambda w: _fuse_qkv(w, s.kv_repeat)),
            "wo": stack(lambda w: w["wo"])}
    mlp = {"norm": stack(lambda w: w["mlp_norm"]), "w_gate_up": stack(gate_up), "w_down": stack(lambda w: w["w_down"])}
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
    if "lm_head" in g:  # quantized: every part padded alike (padded columns dequantize to 0)
        tree["lm_head"] = jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, pad))), g["lm_head"])
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


def abstract_params(layout: Layout, dtype, quantize: QuantSpec | None = None) -> dict:
    """Shapes and dtypes of the model tree for `layout` (global sizes), from plain weights quantized as `quantize`
    says."""
    c = layout.config
    layer = {k: jax.ShapeDtypeStruct(v, dtype) for k, v in layer_shapes(c).items()}
    g = {k: jax.ShapeDtypeStruct(v, dtype) for k, v in global_shapes(c).items()}
    tree = jax.eval_shape(lambda g: assemble_globals(layout, as_held(g, quantize, dtype)), g)
    for s in layout.stages:
        tree[s.name] = jax.eval_shape(lambda ls, s=s: assemble_stage(s, c, [as_held(w, quantize, dtype) for w in ls]),
                                      [layer] * s.stack)
    return tree


def param_shardings(layout: Layout, mesh: Mesh, dtype, quantize: QuantSpec | None = None) -> dict:
    specs = RULES.param_specs(abstract_params(layout, dtype, quantize), layout)
    return jax.tree.map(lambda sp: NamedSharding(mesh, sp), specs, is_leaf=lambda x: isinstance(x, P))


def resolve_quantize(source: WeightSource, requested: QuantSpec | None) -> QuantSpec | None:
    """How a model from `source` is held: as `--quantize` asks, else as its checkpoint stores it; or one line on why
    a checkpoint that is already quantized cannot be held as asked."""
    stored = source.quantized
    if requested is None or requested == stored:
        return stored
    if requested.kind == "gguf":
        raise LPJaxError(f"--quantize gguf keeps a GGUF file's own quantized types, and {source.description} is "
                         "not a GGUF file")
    if stored is not None:
        raise LPJaxError(f"{requested.flags()}: {source.description} is already quantized as {stored.describe()}; "
                         f"load it without --quantize (or with {stored.flags()})")
    return requested


def check_groups(layout: Layout, spec: QuantSpec | None) -> None:
    """Groups of `spec.group_size` inputs must tile every quantized matrix's input, on each device: the input of wo
    and w_down is split with the heads and MLP columns, and a group may not straddle two devices."""
    if spec is None or spec.group_size is None:
        return
    c, g = layout.config, spec.group_size
    inputs = [("the hidden size (the input of q/k/v and gate/up" + ("" if c.tied_embeddings else ", and the LM head")
               + ")", c.dim, 1)]
    for s in layout.stages:
        inputs += [("the attention output (wo's input)", c.n_heads * c.head_dim, s.split),
                   ("the MLP width (w_down's input)", c.ffn_dim, s.split)]
    for what, width, split in dict.fromkeys(inputs):
        if (width // split) % g:
            where = f" split {split} ways on {layout.n_devices} devices, {width // split} a device" if split > 1 else ""
            raise LPJaxError(f"{spec.flags()}: groups of {g} inputs do not divide {what}, {width}{where}")


def _placed(fn, example, layout: Layout, mesh: Mesh, name: str | None = None):
    """`fn` jitted with its outputs sharded as the rules say for the tree it makes of `example` (a stage's tree
    under `name`, or the globals)."""
    shapes = jax.eval_shape(fn, example)
    specs = RULES.param_specs({name: shapes} if name else shapes, layout)
    return jax.jit(fn, out_shardings=named(mesh, specs[name] if name else specs))


def load_params(source: WeightSource, layout: Layout, mesh: Mesh, dtype,
                progress: Callable[[int, int], None] | None = None, quantize: QuantSpec | None = None) -> dict:
    """Read `source` stage by stage into the model tree of `layout`, sharded over `mesh`, its matrices held as
    `quantize` says (None: plain, in `dtype`). Each stage is quantized as it is assembled: the peak is the quantized
    model and one plain stage."""
    c = layout.config
    check_groups(layout, quantize)
    int4 = int4_storage(mesh.devices.flat[0].platform)
    g = source.read(_global_shardings(layout, mesh), dtype)
    params = _placed(lambda g: assemble_globals(layout, as_held(g, quantize, dtype, int4)), g, layout, mesh)(g)
    del g
    assemblers: dict = {}
    for n, s in enumerate(layout.stages):
        shardings = _layer_shardings(s, mesh, c)
        layers = []
        for i in s.stage.layers:
            got = source.read({f"{k}@{i}": sh for k, sh in shardings.items()}, dtype)
            layers.append({k.partition("@")[0]: v for k, v in got.items()})
        kind = (s.stack, s.kv_repeat, str(jax.tree.map(lambda x: (x.shape, x.dtype), layers)))
        if kind not in assemblers:
            build = lambda ls, s=s: assemble_stage(s, c, [as_held(w, quantize, dtype, int4) for w in ls])  # noqa: E731
            assemblers[kind] = _placed(build, layers, layout, mesh, s.name)
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
