"""A model's weights on a mesh and the programs compiled over them.

- Forward: the local `LlamaLM` inside `shard_map` over the ("pair", "tp") mesh, params and cache sharded per
  `ShardingRules`; logits come out replicated.
- Prefill: one compile per prompt-length bucket (powers of two); rows are left-padded to a common length so every
  row writes the cache at the same slot; only the last position's logits are computed.
- Every program is compiled ahead of time once per static key, and run once before anything times it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.cache import Cache, StageCache
from lpjax.compile import CompileCache
from lpjax.model import LlamaLM, Mode, Positions
from lpjax.quantize import nbytes
from lpjax.sharding import RULES, Layout, named

MIN_BUCKET = 16


def prefill_bucket(n: int) -> int:
    """Power-of-two prompt bucket (at least MIN_BUCKET): one compile serves every prompt up to its size."""
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def cache_shape(cache: Cache) -> tuple[int, ...]:
    """[stack, batch, kv_heads, max_len, head_dim] of the first stage's cache (all stages share batch/max_len)."""
    return next(iter(cache.values())).k.shape


class Programs:
    """The parameters of one layout on its mesh, and the compiled programs that run them."""

    def __init__(self, layout: Layout, mesh: Mesh, params: dict, dtype, attention: str, quant_kernel: str = "xla"):
        self.layout, self.mesh, self.params, self.dtype, self.attention = layout, mesh, params, dtype, attention
        self.quant_kernel = quant_kernel  # what runs decode-sized products of quantized weights (`quantize.product`)
        self.config = layout.config
        self.param_specs = RULES.param_specs(params, layout)
        self.cache_specs = RULES.cache_specs(layout)
        self.compiled = CompileCache()  # one executable per static shape / setting
        self._warmed: set = set()  # keys whose executable has run once
        self.compile_s = 0.0  # seconds spent compiling and on first runs, kept out of every timing

    @property
    def on_gpu(self) -> bool:
        return self.mesh.devices.flat[0].platform == "gpu"

    def weight_bytes(self) -> int:
        """Bytes of all the weights, each array once whatever its sharding (int4 at half a byte)."""
        return nbytes(self.params)

    def local_model(self, span: tuple[int, int] | None = None) -> LlamaLM:
        """The per-device model (run inside `shard_map`), of stages `span` only when given."""
        return LlamaLM(self.layout, per_device=True, param_dtype=self.dtype, attention_impl=self.attention, span=span,
                       quant_kernel=self.quant_kernel)

    def forward(self, mode: Mode, cached: bool, one_position: bool):
        """The model's forward as a function of global arrays, run per device inside `shard_map`:
        `fwd(params, tokens, pos, cache)`, or with `one_position` `fwd(params, tokens, pos, cache, logits_index)`."""
        per_device = self.local_model()

        def body(params, tokens, pos, cache, *logits_index):
            return per_device.apply({"params": params}, tokens, pos, cache, mode, *logits_index)

        cache_spec = self.cache_specs if cached else P()
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=(self.param_specs, P(), P(), cache_spec) + ((P(),) if one_position else ()),
            out_specs=(P(), cache_spec), check_vma=False,
        )

    def put(self, x) -> jax.Array:
        """A host array as a replicated global array (works in multi-process runs too)."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, P()), lambda idx: x[idx])

    @staticmethod
    def get(x: jax.Array) -> np.ndarray:
        """A replicated global array on the host."""
        return np.asarray(x.addressable_data(0))

    def compile(self, key, build: Callable[[], Callable], *args):
        """`build()` compiled for `args` once per `key`; the seconds count as compile time."""
        before = self.compiled.seconds
        compiled = self.compiled.get(key, build, args)
        self.compile_s += self.compiled.seconds - before
        return compiled

    def first_run(self, key, cache: Cache, run: Callable[[Cache], Cache]) -> Cache:
        """The first time `key` runs, run it once outside the timings (`run` maps the cache to the cache to go on
        with): the first execution also sets up collectives and buffers (seen on H200: a 2-GPU prefill took 0.96 s
        the first time, 0.03 s after). Its time counts as compile time."""
        if key in self._warmed:
            return cache
        t0 = time.perf_counter()
        cache = jax.block_until_ready(run(cache))
        self.compile_s += time.perf_counter() - t0
        self._warmed.add(key)
        return cache

    # ---------------------------------------------------------------- full forward (eval, tests)

    def full(self, tokens, pad, name: str, post: Callable) -> np.ndarray:
        """Full causal forward over left-padded rows (no cache), then `post(logits, tokens)` on device."""
        tokens = np.asarray(tokens, np.int32)
        B, T = tokens.shape
        padded = pad is not None and bool(np.any(pad))
        pad = np.zeros(B, np.int32) if pad is None else np.asarray(pad, np.int32)
        fwd = self.forward(Mode(padded=padded), cached=False, one_position=False)

        def run(params, tokens, pad):
            return post(fwd(params, tokens, Positions.prompt(pad, T), None)[0], tokens)

        args = (self.params, self.put(tokens), self.put(pad))
        return self.get(self.compile((name, B, T, padded), lambda: jax.jit(run), *args)(*args))

    # ---------------------------------------------------------------- cache and prefill

    def init_cache(self, batch: int, max_len: int) -> Cache:
        c = self.config
        shardings = named(self.mesh, self.cache_specs)

        def zeros():
            return {s.name: StageCache(*(jnp.zeros((s.stack, batch, s.kv_heads, max_len, c.head_dim), self.dtype)
                                         for _ in ("k", "v"))) for s in self.layout.stages}

        return self.compile(("cache", batch, max_len), lambda: jax.jit(zeros, out_shardings=shardings))()

    def prefill(self, cache: Cache, prompts: list[list[int]], pad_id: int = 0):
        """Run the prompts (left-padded) through the model, filling the cache. Returns (last logits [B, V],
        cache, n, pad): n is the padded prompt length (the next cache slot), pad the left padding per row."""
        B = len(prompts)
        n = max(len(p) for p in prompts)
        L = cache_shape(cache)[3]
        bucket = min(prefill_bucket(n), L)
        tokens = np.full((B, bucket), pad_id, np.int32)
        pad = np.array([n - len(p) for p in prompts], np.int32)
        for b, p in enumerate(prompts):
            tokens[b, pad[b]:n] = p
        padded = bool(pad.any())
        fwd = self.forward(Mode(padded=padded), cached=True, one_position=True)

        def run(params, cache, tokens, pad, last):
            return fwd(params, tokens, Positions.prompt(pad, tokens.shape[1]), cache, last)

        key = ("prefill", B, bucket, L, padded)
        inputs = (self.put(tokens), self.put(pad), self.put(np.int32(n - 1)))
        fn = self.compile(key, lambda: jax.jit(run, donate_argnums=1), self.params, cache, *inputs)
        # the warm-up writes the same cache slots the real run then overwrites
        cache = self.first_run(key, cache, lambda c: fn(self.params, c, *inputs)[1])
        logits, cache = fn(self.params, cache, *inputs)
        return logits, cache, n, pad
