"""Random weights at a preset's real shapes (`--model random:NAME`), for benchmarks and demos."""

from __future__ import annotations

import zlib
from functools import partial

import jax
import jax.numpy as jnp

from lpjax.config import preset
from lpjax.schema import BY_NAME, global_shapes, layer_shapes
from lpjax.weights import WeightSource


class RandomSource(WeightSource):
    """Random weights generated on device in the target dtype (speed does not depend on the values), initialised as
    the schema says. A weight's random key depends only on its canonical key, so every plan and mesh sees the same
    model. One jitted generator per layer layout: compiled once, called per layer."""

    def __init__(self, name: str, seed: int = 0):
        self.config = preset(name)
        self.hf_config = None
        self.seed = seed
        self.description = f"random:{name} (random weights at real shapes)"
        self._makers: dict = {}

    def read(self, keys, dtype):
        by_layer: dict[str, dict] = {}
        for key, sharding in keys.items():
            name, _, layer = key.partition("@")
            by_layer.setdefault(layer, {})[name] = sharding
        out = {}
        for layer, shardings in by_layer.items():
            shapes = (layer_shapes if layer else global_shapes)(self.config)
            names = tuple(sorted(shardings))
            sig = (names, tuple(shardings[n] for n in names), jnp.dtype(dtype).name)
            if sig not in self._makers:
                self._makers[sig] = jax.jit(partial(self._draw, {n: shapes[n] for n in names}, dtype),
                                            out_shardings=dict(shardings))
            rng = jax.random.fold_in(jax.random.key(self.seed), int(layer) + 1 if layer else 0)
            got = self._makers[sig](rng)
            out.update({f"{n}@{layer}" if layer else n: v for n, v in got.items()})
        return out

    def _draw(self, shapes: dict[str, tuple[int, ...]], dtype, rng) -> dict[str, jax.Array]:
        """Each weight by its schema init; a matrix's key folds in a hash of its name."""
        out = {}
        for name, shape in shapes.items():
            init = BY_NAME[name].init(self.config)
            if not init.std:
                out[name] = jnp.full(shape, init.fill, dtype)
            else:
                key = jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)
                out[name] = (init.std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        return out
