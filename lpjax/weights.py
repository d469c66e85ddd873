"""Weights: the canonical per-layer format, where weights come from, and how a plan stacks them onto a mesh.

Canonical format (plan-independent, what checkpoints store): globals `embedding` [V, D], `norm` [D], `lm_head`
[D, V] (untied only), and for each layer i `wq` [D, H, hd], `wk`/`wv` [D, K, hd], `wo` [H*hd, D], `w_gate`/`w_up`
[D, F], `w_down` [F, D], norms [D] and optional biases. Keys are `name` for globals and `name@i` for layer i.

Sources: an HF directory (lazy memory-mapped safetensors), a converted lpjax directory (Orbax, one checkpoint per
layer), or random weights at a preset's shape. Every source hands out one layer at a time, already placed on the
devices that need it; `load_params` then stacks each stage under `jit` with the stage's output sharding, so pairs
are restacked on device and no model is ever whole in host memory or on one device.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.config import ModelConfig, preset, read_hf_config
from lpjax.errors import LPJaxError
from lpjax.model import INIT_STD
from lpjax.sharding import RULES, Layout, StageLayout

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

ATTENTION_BIASES = ("bq", "bk", "bv", "bo")
MLP_BIASES = ("b_gate", "b_up", "b_down")


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical shapes of one layer's weights."""
    D, H, K, hd, F = config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim
    shapes = {
        "attn_norm": (D,), "wq": (D, H, hd), "wk": (D, K, hd), "wv": (D, K, hd), "wo": (H * hd, D),
        "bq": (H, hd), "bk": (K, hd), "bv": (K, hd), "bo": (D,),
        "mlp_norm": (D,), "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D),
        "b_gate": (F,), "b_up": (F,), "b_down": (D,),
    }
    skip = (() if config.attention_bias else ATTENTION_BIASES) + (() if config.mlp_bias else MLP_BIASES)
    return {k: v for k, v in shapes.items() if k not in skip}


def global_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"embedding": (config.vocab_size, config.dim), "norm": (config.dim,)}
    if not config.tied_embeddings:
        shapes["lm_head"] = (config.dim, config.vocab_size)
    return shapes


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical weight of the model, keyed `name` or `name@layer`."""
    out = dict(global_shapes(config))
    for i in range(config.n_layers):
        out.update({f"{n}@{i}": s for n, s in layer_shapes(config).items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sources


class WeightSource:
    """Hands out canonical weights already placed with the given shardings."""

    config: ModelConfig
    description: str
    directory: Path | None = None  # where config and tokenizer live (None: random weights)
    dtype: np.dtype | None = None  # what the checkpoint stores (None: random weights)

    def read(self, keys: dict[str, NamedSharding], dtype) -> dict[str, jax.Array]:
        raise NotImplementedError


class HFSource(WeightSource):
    """An HF directory: each device's shard is sliced straight out of the memory-mapped safetensors."""

    def __init__(self, directory: Path):
        from lpjax.hf import HFCheckpoint

        self.directory = directory
        self.config, self.hf_config = read_hf_config(directory)
        self.checkpoint = HFCheckpoint(directory, self.config, canonical_shapes(self.config))
        self.dtype = self.checkpoint.dtype
        self.description = f"Hugging Face checkpoint {directory}"

    def read(self, keys, dtype):
        out = {}
        for key, sharding in keys.items():
            view = self.checkpoint.views[key]
            out[key] = jax.make_array_from_callback(
                view.shape, sharding, lambda idx, view=view: np.asarray(view[idx]).astype(dtype)
            )
        return out


class RandomSource(WeightSource):
    """Random weights at a preset's shape, generated on device in the target dtype (speed does not depend on the
    values). A weight's random key depends only on its canonical key, so every plan and mesh sees the same model.
    One jitted generator per layer layout: compiled once, called per layer."""

    def __init__(self, name: str, seed: int = 0):
        self.config = preset(name)
        self.hf_config = None
        self.seed = seed
        self.description = f"random:{name} (random weights at real shapes)"
        self._makers: dict = {}

    def read(self, keys, dtype):
        by_layer: dict[str, dict[str, NamedSharding]] = {}
        for key, sharding in keys.items():
            name, _, layer = key.partition("@")
            by_layer.setdefault(layer, {})[name] = sharding
        out = {}
        for layer, shardings in by_layer.items():
            shapes = (layer_shapes if layer else global_shapes)(self.config)
            names = tuple(sorted(shardings))
            sig = (names, tuple(shardings[n] for n in names), jnp.dtype(dtype).name)
            if sig not in self._makers:
                self._makers[sig] = jax.jit(partial(_random_weights, {n: shapes[n] for n in names}, dtype),
                                            out_shardings=dict(shardings))
            rng = jax.random.fold_in(jax.random.key(self.seed), int(layer) + 1 if layer else 0)
            got = self._makers[sig](rng)
            out.update({f"{n}@{layer}" if layer else n: v for n, v in got.items()})
        return out


def _random_weights(shapes: dict[str, tuple[int, ...]], dtype, rng) -> dict[str, jax.Array]:
    """Norms 1, biases 0, matrices N(0, INIT_STD); each weight's key folds in a hash of its name."""
    out = {}
    for name, shape in shapes.items():
        if "norm" in name:
            out[name] = jnp.ones(shape, dtype)
        elif name.startswith("b"):
            out[name] = jnp.zeros(shape, dtype)
        else:
            key = jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            out[name] = (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return out


def open_source(model: str, seed: int = 0) -> WeightSource:
    """`random:NAME`, a GGUF file or named GGUF model (`lpjax.gguf`), a converted lpjax directory, or an HF
    directory."""
    if model.startswith("random:"):
        return RandomSource(model.split(":", 1)[1], seed)
    from lpjax.gguf import GGUFSource, gguf_path

    if (gguf_file := gguf_path(model)) is not None:
        return GGUFSource(gguf_file)
    path = Path(model)
    if not path.exists():
        hint = " (lpjax reads local directories only; download the checkpoint first)" if (
            model.count("/") == 1 and not model.startswith((".", "/"))) else ""
        raise LPJaxError(f"--model {model}: no such file or directory{hint}")
    if not path.is_dir():
        raise LPJaxError(f"--model {model}: not a directory or GGUF file (expected an HF or lpjax model directory, a "
                         "GGUF file, or random:NAME)")
    from lpjax.checkpoint import OrbaxSource, is_converted

    if is_converted(path):
        return OrbaxSource(path)
    return HFSource(path)


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
