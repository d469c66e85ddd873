"""The inference engine: a loaded model on a mesh, jitted prefill and decode over a static KV cache.

- Forward: the local `LlamaLM` inside `shard_map` over the ("pair", "tp") mesh, params and cache sharded per
  `ShardingRules`; logits come out replicated.
- Prefill: one compile per prompt-length bucket (powers of two); rows are left-padded to a common length so every
  row writes the cache at the same slot; only the last position's logits are computed.
- Decode: one jitted `lax.while_loop` that feeds the last token, samples on device and stops at EOS or the token
  budget; the host only sees the loop's result (or a chunk of it, for streaming). The cache is donated.
- A step called from the host (`next_token`, `decode_step`): a chain of programs of `STEP_SPAN` stages each, every
  buffer kept in place from call to call, so the GPU starts on the first while the host launches the rest.

The cache is a dict of `StageCache` per stage, the loop's carry a `DecodeState`: both registered dataclasses.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.cache import StageCache
from lpjax.compile import CompileCache, resolve_attention
from lpjax.config import round_up
from lpjax.errors import LPJaxError
from lpjax.model import DECODE, LlamaLM, Mode, Positions, stream_rows
from lpjax.plan import LPPlan
from lpjax.sampling import Sampling, sample
from lpjax.sharding import RULES, Layout, describe_mesh, make_mesh, named
from lpjax.sources import open_source
from lpjax.weights import DTYPES, WeightSource, load_params, source_dtype

MIN_BUCKET = 16
CACHE_MULTIPLE = 128
# Stages per program of a host-called step. One program of a whole Llama-2-7B step is one CUDA graph of ~490 kernels:
# on H200 the call returned only 1.5-2 ms after it began, the GPU mostly idle meanwhile; a chain of programs of 4
# stages each lets the GPU run the first while the host launches the next (bench/NOTES.md, session 5).
STEP_SPAN = 4


def _eos_array(eos: tuple[int, ...]) -> jax.Array:
    """EOS ids as an array for `jnp.isin` (-1, which no token is, when there are none)."""
    return jnp.array(eos or (-1,), jnp.int32)


def prefill_bucket(n: int) -> int:
    """Power-of-two prompt bucket (at least MIN_BUCKET): one compile serves every prompt up to its size."""
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


@struct.dataclass
class DecodeState:
    """The decode loop's carry: `out` [B, max_new_tokens] tokens so far (`count` of them), `done` [B] rows that hit
    EOS, the sampling `key`, the cache slot `index` of the next token, the left padding `pad` [B]."""

    out: jax.Array
    done: jax.Array
    key: jax.Array
    count: jax.Array
    index: jax.Array
    pad: jax.Array


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each prompt (EOS included when reached)
    prompt_tokens: int  # tokens of the longest prompt
    prefill_s: float
    decode_s: float
    decode_steps: int  # forward passes of the decode loop (new tokens after the first)
    compile_s: float
    batch: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def decode_ms_per_step(self) -> float:
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else 0.0


class Engine:
    """A model with an LP plan, loaded onto a mesh."""

    def __init__(self, source: WeightSource, plan: LPPlan, mesh: Mesh, dtype: str, params: dict | None = None,
                 attention: str = "auto", progress: Callable[[int, int], None] | None = None):
        self.source, self.config, self.plan, self.mesh = source, source.config, plan, mesh
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.layout = Layout.build(self.config, plan, mesh)
        self.attention = resolve_attention(attention, mesh.devices.flat[0].platform, dtype)
        if params is None:  # `progress(stages loaded, stages)` reports the load
            params = load_params(source, self.layout, mesh, self.dtype, progress)
        self.params = params
        self.param_specs = RULES.param_specs(params, self.layout)
        self.cache_specs = RULES.cache_specs(self.layout)
        self._compiled = CompileCache()  # one executable per static shape / setting
        self._warmed: set = set()  # keys whose executable has run once
        self._chains: dict = {}  # a host-called step's programs, per key (`_step_chain`)
        self._streams: dict[int, jax.Array] = {}  # the host-called step's residual stream buffer, per batch size
        self.compile_s = 0.0  # seconds spent compiling and on first runs, kept out of every timing
        self._tokenizer = None

    # ---------------------------------------------------------------- construction

    @classmethod
    def load(cls, model: str, lp: str | None = None, devices: int | None = None, dtype: str | None = None,
             seed: int = 0, attention: str = "auto", progress: Callable[[int, int], None] | None = None) -> Engine:
        source = open_source(model, seed)
        mesh = make_mesh(devices)
        if dtype is None:  # the checkpoint's; random weights: bfloat16, but float32 on CPUs (no fast bf16 there)
            dtype = source_dtype(source)
            if source.directory is None and mesh.devices.flat[0].platform == "cpu":
                dtype = "float32"
        if dtype not in DTYPES:
            raise LPJaxError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        plan = LPPlan.parse(lp, source.config.n_layers)
        return cls(source, plan, mesh, dtype, attention=attention, progress=progress)

    def with_plan(self, lp: str | LPPlan) -> Engine:
        """The same weights under another plan (re-read from the source; checkpoints are plan-independent)."""
        plan = lp if isinstance(lp, LPPlan) else LPPlan.parse(lp, self.config.n_layers)
        return Engine(self.source, plan, self.mesh, self.dtype_name, attention=self.attention)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lpjax.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.source.directory, self.config.vocab_size, self.config.eos_token_ids)
        return self._tokenizer

    def describe(self) -> str:
        return (f"{self.source.description}; {self.config.n_layers} layers, {self.config.n_params / 1e9:.3g}B params, "
                f"{self.dtype_name}; LP plan {self.plan.describe()}; {describe_mesh(self.mesh)}")

    # ---------------------------------------------------------------- sharded forward

    def _forward(self, mode: Mode, cached: bool, one_position: bool):
        """The model's forward as a function of global arrays, run per device inside `shard_map`:
        `fwd(params, tokens, pos, cache)`, or with `one_position` `fwd(params, tokens, pos, cache, logits_index)`."""
        per_device = LlamaLM(self.layout, per_device=True, param_dtype=self.dtype, attention_impl=self.attention)

        def body(params, tokens, pos, cache, *logits_index):
            return per_device.apply({"params": params}, tokens, pos, cache, mode, *logits_index)

        cache_spec = self.cache_specs if cached else P()
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=(self.param_specs, P(), P(), cache_spec) + ((P(),) if one_position else ()),
            out_specs=(P(), cache_spec), check_vma=False,
        )

    def _put(self, x) -> jax.Array:
        """A host array as a replicated global array (works in multi-process runs too)."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, P()), lambda idx: x[idx])

    @staticmethod
    def _get(x: jax.Array) -> np.ndarray:
        """A replicated global array on the host."""
        return np.asarray(x.addressable_data(0))

    def _compile(self, key, build: Callable[[], Callable], *args):
        before = self._compiled.seconds
        compiled = self._compiled.get(key, build, args)
        self.compile_s += self._compiled.seconds - before
        return compiled

    def _first_run(self, key, cache: dict[str, StageCache], run: Callable) -> dict[str, StageCache]:
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

    @staticmethod
    def _cache_shape(cache: dict[str, StageCache]) -> tuple[int, ...]:
        """[stack, batch, kv_heads, max_len, head_dim] of the first stage's cache (all stages share batch/max_len)."""
        return next(iter(cache.values())).k.shape

    # ---------------------------------------------------------------- full forward (eval, tests)

    def _full(self, tokens, pad, name: str, post: Callable) -> np.ndarray:
        """Full causal forward over left-padded rows (no cache), then `post(logits, tokens)` on device."""
        tokens = np.asarray(tokens, np.int32)
        B, T = tokens.shape
        padded = pad is not None and bool(np.any(pad))
        pad = np.zeros(B, np.int32) if pad is None else np.asarray(pad, np.int32)
        fwd = self._forward(Mode(padded=padded), cached=False, one_position=False)

        def run(params, tokens, pad):
            return post(fwd(params, tokens, Positions.prompt(pad, T), None)[0], tokens)

        args = (self.params, self._put(tokens), self._put(pad))
        return self._get(self._compile((name, B, T, padded), lambda: jax.jit(run), *args)(*args))

    def logits(self, tokens: np.ndarray, pad: np.ndarray | None = None) -> np.ndarray:
        """Logits [B, T, V] (float32) of a full causal forward."""
        return self._full(tokens, pad, "logits", lambda logits, t: logits)

    def token_scores(self, tokens: np.ndarray) -> np.ndarray:
        """[B, T-1, 2]: the NLL of tokens[:, 1:] given their prefixes, and 1.0 where the most likely next token was
        it (the next-token accuracy's hits), computed on device."""

        def scores(logits, t):
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            nll = -jnp.take_along_axis(logp, t[:, 1:, None], axis=-1)[..., 0]
            hit = (jnp.argmax(logits[:, :-1], axis=-1) == t[:, 1:]).astype(nll.dtype)
            return jnp.stack([nll, hit], axis=-1)

        return self._full(tokens, None, "scores", scores)

    # ---------------------------------------------------------------- cache, prefill, decode

    def init_cache(self, batch: int, max_len: int) -> dict[str, StageCache]:
        c = self.config
        shardings = named(self.mesh, self.cache_specs)

        def zeros():
            return {s.name: StageCache(*(jnp.zeros((s.stack, batch, s.kv_heads, max_len, c.head_dim), self.dtype)
                                         for _ in ("k", "v"))) for s in self.layout.stages}

        return self._compile(("cache", batch, max_len), lambda: jax.jit(zeros, out_shardings=shardings))()

    def cache_length(self, prompt_len: int, max_new_tokens: int, max_len: int | None) -> int:
        """Static cache length: room for the prompt bucket and every new token, within the context."""
        limit = max_len or self.config.max_seq_len
        if prompt_len + max_new_tokens > limit:
            raise LPJaxError(
                f"prompt of {prompt_len} tokens plus --max-new-tokens {max_new_tokens} does not fit the context of "
                f"{limit} tokens" + ("" if max_len else " (the model's max_position_embeddings)")
            )
        return min(limit, round_up(max(prefill_bucket(prompt_len), prompt_len + max_new_tokens), CACHE_MULTIPLE))

    def prefill(self, cache: dict[str, StageCache], prompts: list[list[int]], pad_id: int = 0):
        """Run the prompts (left-padded) through the model, filling the cache. Returns (last logits [B, V],
        cache, n, pad): n is the padded prompt length (the next cache slot), pad the left padding per row."""
        B = len(prompts)
        n = max(len(p) for p in prompts)
        L = self._cache_shape(cache)[3]
        bucket = min(prefill_bucket(n), L)
        tokens = np.full((B, bucket), pad_id, np.int32)
        pad = np.array([n - len(p) for p in prompts], np.int32)
        for b, p in enumerate(prompts):
            tokens[b, pad[b]:n] = p
        padded = bool(pad.any())
        fwd = self._forward(Mode(padded=padded), cached=True, one_position=True)

        def run(params, cache, tokens, pad, last):
            return fwd(params, tokens, Positions.prompt(pad, tokens.shape[1]), cache, last)

        key = ("prefill", B, bucket, L, padded)
        inputs = (self._put(tokens), self._put(pad), self._put(np.int32(n - 1)))
        fn = self._compile(key, lambda: jax.jit(run, donate_argnums=1), self.params, cache, *inputs)
        # the warm-up writes the same cache slots the real run then overwrites
        cache = self._first_run(key, cache, lambda c: fn(self.params, c, *inputs)[1])
        logits, cache = fn(self.params, cache, *inputs)
        return logits, cache, n, pad

    def _step_chain(self, key: tuple, post: Callable, batch: int, cache: dict[str, StageCache]) -> list:
        """The programs of a host-called step, compiled once per key: [(stage names, their params, program)].

        Program i runs `STEP_SPAN` stages; `prog(params, stream, ids, cache)` returns (the stream, or for the last
        `post(logits)`, and its stages' new cache). Every buffer stays put from call to call, which is what lets XLA
        replay its CUDA graphs without re-recording them (a re-record of a whole step took ~0.4 ms): the cache and
        the stream are donated and come back in place, and on GPUs the result is written to pinned host memory
        rather than into a fresh device buffer each call."""
        if key in self._chains:
            return self._chains[key]
        stages, B = self.layout.stages, batch
        stage_names = {s.name for s in stages}
        shared = [k for k in self.params if k not in stage_names]  # embedding, final norm, LM head
        on_gpu = self.mesh.devices.flat[0].platform == "gpu"
        stream, ids = self._take_stream(B), self._put(np.zeros(2 * B + 1, np.int32))
        chain = []
        for start in range(0, len(stages), STEP_SPAN):
            stop = min(start + STEP_SPAN, len(stages))
            first, last = start == 0, stop == len(stages)
            names = [s.name for s in stages[start:stop]]
            keys = names + (shared if first or last else [])
            params = {k: self.params[k] for k in keys}
            cache_specs = {k: self.cache_specs[k] for k in names}
            model = LlamaLM(self.layout, per_device=True, param_dtype=self.dtype, attention_impl=self.attention,
                            span=(start, stop))

            def body(params, stream, ids, cache, model=model, first=first, last=last):
                pos = Positions.step(ids[B:2 * B], ids[2 * B])
                out, cache = model.apply({"params": params}, ids[:B, None] if first else stream, pos, cache, DECODE)
                return (post(out[:, 0]) if last else out), cache

            def build(body=body, params=params, cache_specs=cache_specs, last=last):
                fn = jax.shard_map(body, mesh=self.mesh, in_specs=({k: self.param_specs[k] for k in params}, P(),
                                                                    P(), cache_specs),
                                   out_specs=(P(), cache_specs), check_vma=False)
                out = NamedSharding(self.mesh, P(), memory_kind="pinned_host") if last and on_gpu else None
                return jax.jit(fn, donate_argnums=(3,) if last else (1, 3),
                               out_shardings=(out, named(self.mesh, cache_specs)) if out else None)

            sub_cache = {k: cache[k] for k in names}
            chain.append((names, params, self._compile(key + (start,), build, params, stream, ids, sub_cache)))
        self._streams[B] = stream
        self._chains[key] = chain
        return chain

    def _take_stream(self, batch: int) -> jax.Array:
        """The residual-stream buffer a host-called step hands along its chain (donated, so it stays put), taken out
        of the engine while a call holds it: a call that fails leaves no deleted buffer behind."""
        stream = self._streams.pop(batch, None)
        return stream if stream is not None else self._put(
            np.zeros((stream_rows(batch, 1), 1, self.config.dim), self.dtype))

    def _run_chain(self, chain: list, cache: dict[str, StageCache], ids: jax.Array):
        """One host-called step through `chain`: (the last program's result, the new cache). `ids` is
        [tokens (B), pad (B), index]."""
        B = (ids.shape[0] - 1) // 2
        cache, stream = dict(cache), self._take_stream(B)
        for i, (names, params, program) in enumerate(chain):
            out, new = program(params, stream, ids, {k: cache[k] for k in names})
            cache.update(new)
            if i < len(chain) - 1:
                stream = out
        self._streams[B] = stream
        return out, cache

    def _host_step(self, name: str, post: Callable, cache: dict[str, StageCache], tokens, index: int,
                   pad) -> tuple[np.ndarray, dict[str, StageCache]]:
        """One decode step called from the host: `tokens` [B] fed at cache slot `index`, then `post(logits [B, V])`
        on device; returns its result on the host and the new cache (donated). The ids go up as one array and the
        step runs as a chain of programs (`_step_chain`)."""
        tokens = np.asarray(tokens, np.int32)
        B = len(tokens)
        ids = self._put(np.concatenate([tokens, np.asarray(pad, np.int32), [index]]).astype(np.int32))
        key = (name, B, self._cache_shape(cache))
        chain = self._step_chain(key, post, B, cache)
        # the warm-up writes the same cache slot the real run then writes again
        cache = self._first_run(key, cache, lambda c: self._run_chain(chain, c, ids)[1])
        out, cache = self._run_chain(chain, cache, ids)
        return self._get(out), cache

    def decode_step(self, cache: dict[str, StageCache], tokens, index: int,
                    pad) -> tuple[np.ndarray, dict[str, StageCache]]:
        """One decode step called from the host: feed `tokens` [B] at cache slot `index`; returns (logits [B, V]
        on the host, new cache). The engine's own loop never does this per token; tests and latency probes do."""
        return self._host_step("step", lambda logits: logits, cache, tokens, index, pad)

    def next_token(self, cache: dict[str, StageCache], tokens, index: int,
                   pad) -> tuple[np.ndarray, dict[str, StageCache]]:
        """The same step with the greedy choice made on the device: only the next token ids [B] come back to the
        host, not [B, V] float32 logits (128 KB a row for a 32k vocabulary: ~0.46 ms on H200, bench/NOTES.md)."""
        return self._host_step("next", lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32), cache, tokens,
                               index, pad)

    def _decode_loop(self, sampling: Sampling, steps: int, eos: tuple[int, ...], pad_id: int):
        fwd = self._forward(DECODE, cached=True, one_position=False)
        eos_ids = _eos_array(eos)

        def loop(params, cache, state: DecodeState):
            def cond(carry):
                _, st, i = carry
                return (i < steps) & (st.count < st.out.shape[1]) & ~jnp.all(st.done)

            def body(carry):
                cache, st, i = carry
                token = jax.lax.dynamic_index_in_dim(st.out, st.count - 1, axis=1, keepdims=False)
                index = st.index
                logits, cache = fwd(params, token[:, None], Positions.step(st.pad, index), cache)
                key, sub = jax.random.split(st.key)
                nxt = jnp.where(st.done, pad_id, sample(logits[:, 0], sub, sampling))
                out = jax.lax.dynamic_update_slice_in_dim(st.out, nxt[:, None], st.count, axis=1)
                done = st.done | jnp.isin(nxt, eos_ids)
                st = st.replace(out=out, done=done, key=key, count=st.count + 1, index=index + 1)
                return cache, st, i + 1

            cache, state, _ = jax.lax.while_loop(cond, body, (cache, state, jnp.int32(0)))
            return cache, state

        return loop

    def start_state(self, logits, n: int, pad: np.ndarray, max_new_tokens: int, sampling: Sampling, seed: int,
                    eos: tuple[int, ...]) -> DecodeState:
        """Decode-loop state after prefill: the first new token sampled from the prefill logits."""
        B = logits.shape[0]

        def start(logits, key_data, pad, n):
            key, sub = jax.random.split(jax.random.wrap_key_data(key_data))
            first = sample(logits, sub, sampling)
            out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)
            done = jnp.isin(first, _eos_array(eos))
            return DecodeState(out=out, done=done, key=key, count=jnp.int32(1), index=n, pad=pad)

        args = (logits, self._put(jax.random.key_data(jax.random.key(seed))), self._put(pad), self._put(np.int32(n)))
        fn = self._compile(("start", B, max_new_tokens, sampling, tuple(eos)), lambda: jax.jit(start), *args)
        return fn(*args)

    def decode(self, cache: dict[str, StageCache], state: DecodeState, sampling: Sampling, steps: int,
               eos: tuple[int, ...], pad_id: int):
        """Run up to `steps` decode steps on device (stopping early when every row hit EOS or the budget)."""
        key = ("decode", sampling, steps, tuple(eos), pad_id, state.out.shape, self._cache_shape(cache))
        loop = self._decode_loop(sampling, steps, eos, pad_id)
        fn = self._compile(key, lambda: jax.jit(loop, donate_argnums=(1, 2)), self.params, cache, state)

        def one_step(c):  # on a copy of the state (it is donated), at the cache slot the real run writes first
            scratch = jax.tree.map(jnp.copy, state)
            scratch = scratch.replace(count=jnp.maximum(scratch.count, state.out.shape[1] - 1))
            return fn(self.params, c, scratch)[0]

        cache = self._first_run(key, cache, one_step)
        return fn(self.params, cache, state)

    # ---------------------------------------------------------------- generation

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None = None,
                 seed: int = 0, max_len: int | None = None, eos: tuple[int, ...] | None = None, pad_id: int = 0,
                 on_tokens: Callable[[list[list[int]]], None] | None = None,
                 chunk: int | None = None) -> GenerationResult:
        """Generate up to `max_new_tokens` for each prompt (token ids). `on_tokens` streams each row's tokens so far
        after every chunk of `chunk` decode steps (default: the whole generation in one on-device loop)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LPJaxError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise LPJaxError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        eos = tuple(self.config.eos_token_ids if eos is None else eos)
        sampling = sampling or Sampling()
        steps = chunk or max_new_tokens
        L = self.cache_length(max(len(p) for p in prompts), max_new_tokens, max_len)
        compile_start = self.compile_s
        cache = self.init_cache(len(prompts), L)
        # Compiles happen synchronously on the host inside these calls; their time is measured and taken out.
        t0, c0 = time.perf_counter(), self.compile_s
        logits, cache, n, pad = self.prefill(cache, prompts, pad_id)
        state = self.start_state(logits, n, pad, max_new_tokens, sampling, seed, eos)
        jax.block_until_ready(state.out)
        t1, c1 = time.perf_counter(), self.compile_s
        while True:
            count, done = int(self._get(state.count)), self._get(state.done)
            if on_tokens:
                on_tokens([list(map(int, r)) for r in self._get(state.out)[:, :count]])
            if count >= max_new_tokens or bool(np.all(done)):
                break
            cache, state = self.decode(cache, state, sampling, steps, eos, pad_id)
        t2, c2 = time.perf_counter(), self.compile_s
        out, count = self._get(state.out), int(self._get(state.count))
        tokens = []
        for row in out[:, :count]:
            row = list(map(int, row))
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            tokens.append(row[: stop + 1] if stop is not None else row)
        return GenerationResult(tokens, n, (t1 - t0) - (c1 - c0), (t2 - t1) - (c2 - c1), count - 1,
                                self.compile_s - compile_start, len(prompts))
