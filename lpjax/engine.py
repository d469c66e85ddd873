"""The inference engine: a model with an LP plan, loaded onto a mesh, and what users run on it.

A facade over `lpjax.runtime`: `Programs` (the weights on the mesh and the compiled programs), the on-device decode
loop (`runtime.decode_loop`) and the host-called step (`runtime.host_step.HostStep`). `generate` is prefill, then
the decode loop, timed with compile time taken out.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lpjax.cache import Cache
from lpjax.compile import resolve_attention
from lpjax.config import round_up
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan
from lpjax.quantize import PRODUCT_KERNELS, QuantSpec
from lpjax.runtime import decode_loop
from lpjax.runtime.decode_loop import DecodeState
from lpjax.runtime.host_step import HostStep
from lpjax.runtime.programs import Programs, prefill_bucket
from lpjax.sampling import Sampling
from lpjax.sharding import Layout, describe_mesh, make_mesh
from lpjax.sources import open_source, plan_for
from lpjax.weights import DTYPES, WeightSource, load_params, resolve_quantize, source_dtype

CACHE_MULTIPLE = 128


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


def next_token_scores(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, T-1, 2] from logits [B, T, V] of `tokens` [B, T]: the NLL of tokens[:, 1:] given their prefixes, and 1.0
    where the most likely next token was it: what every perplexity sums (`Engine.token_scores`, and the plan
    search's `quality.plan_data`)."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]).astype(nll.dtype)
    return jnp.stack([nll, hit], axis=-1)


class Engine:
    """A model with an LP plan, loaded onto a mesh; its matrices quantized as `quantize` says (None: plain).
    `quant_kernel`: "xla" (default) or "pallas", the Pallas GEMV for decode-sized products of quantized matrices
    (`quantize.product`); prefill's products stay XLA's either way."""

    def __init__(self, source: WeightSource, plan: LPPlan, mesh: Mesh, dtype: str, params: dict | None = None,
                 attention: str = "auto", progress: Callable[[int, int], None] | None = None,
                 quantize: QuantSpec | None = None, quant_kernel: str = "xla"):
        if quant_kernel not in PRODUCT_KERNELS:
            raise LPJaxError(f"quant_kernel {quant_kernel}: choose one of {', '.join(PRODUCT_KERNELS)}")
        self.source, self.config, self.plan, self.mesh = source, source.config, plan, mesh
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.quantize, self.quant_kernel = quantize, quant_kernel
        self.layout = Layout.build(self.config, plan, mesh)
        self.attention = resolve_attention(attention, mesh.devices.flat[0].platform, dtype)
        if params is None:  # `progress(stages loaded, stages)` reports the load
            params = load_params(source, self.layout, mesh, self.dtype, progress, quantize)
        self.programs = Programs(self.layout, mesh, params, self.dtype, self.attention, quant_kernel)
        self.step = HostStep(self.programs)
        self._tokenizer = None

    @property
    def params(self) -> dict:
        return self.programs.params

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling and on first runs, kept out of every timing."""
        return self.programs.compile_s

    @property
    def quantization(self) -> str | None:
        """How the matrices are held, as tools' JSON and records name it (`QuantSpec`'s string); None: plain."""
        return None if self.quantize is None else str(self.quantize)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the loaded weights, every array once (int4 at half a byte): what the devices hold in all."""
        return self.programs.weight_bytes()

    @classmethod
    def load(cls, model: str, lp: str | None = None, devices: int | None = None, dtype: str | None = None,
             seed: int = 0, attention: str = "auto", progress: Callable[[int, int], None] | None = None,
             quantize: QuantSpec | None = None, quant_kernel: str = "xla") -> Engine:
        """`quantize`: hold the attention and MLP matrices (and an untied LM head) as int8/int4, or a GGUF file's
        own quantized blocks (`QuantSpec.parse("gguf")`); None: as the checkpoint stores them."""
        source = open_source(model, seed, quantize)
        quantize = resolve_quantize(source, quantize)
        mesh = make_mesh(devices)
        if dtype is None:  # the checkpoint's; random weights: bfloat16, but float32 on CPUs (no fast bf16 there)
            dtype = source_dtype(source)
            if source.directory is None and mesh.devices.flat[0].platform == "cpu":
                dtype = "float32"
        if dtype not in DTYPES:
            raise LPJaxError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        plan = LPPlan.parse(plan_for(source, lp), source.config.n_layers)  # lp=None: the plan it was tuned for
        return cls(source, plan, mesh, dtype, attention=attention, progress=progress, quantize=quantize,
                   quant_kernel=quant_kernel)

    def with_plan(self, lp: str | LPPlan) -> Engine:
        """The same weights under another plan (re-read from the source; checkpoints are plan-independent)."""
        plan = lp if isinstance(lp, LPPlan) else LPPlan.parse(lp, self.config.n_layers)
        return Engine(self.source, plan, self.mesh, self.dtype_name, attention=self.attention, quantize=self.quantize,
                      quant_kernel=self.quant_kernel)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lpjax.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.source.directory, self.config.vocab_size, self.config.eos_token_ids)
        return self._tokenizer

    def describe(self) -> str:
        held = "" if self.quantize is None else (f", matrices {self.quantize.describe()} "
                                                 f"({self.weight_bytes / 1e6:.1f} MB of weights)")
        return (f"{self.source.description}; {self.config.n_layers} layers, {self.config.n_params / 1e9:.3g}B params, "
                f"{self.dtype_name}{held}; LP plan {self.plan.describe()}; {describe_mesh(self.mesh)}")

    # ---------------------------------------------------------------- full forward (eval, tests)

    def logits(self, tokens: np.ndarray, pad: np.ndarray | None = None) -> np.ndarray:
        """Logits [B, T, V] (float32) of a full causal forward."""
        return self.programs.full(tokens, pad, "logits", lambda logits, t: logits)

    def token_scores(self, tokens: np.ndarray) -> np.ndarray:
        """[B, T-1, 2]: the NLL of tokens[:, 1:] given their prefixes, and 1.0 where the most likely next token was
        it (the next-token accuracy's hits), computed on device (`next_token_scores`)."""
        return self.programs.full(tokens, None, "scores", next_token_scores)

    # ---------------------------------------------------------------- cache, prefill, decode

    def init_cache(self, batch: int, max_len: int) -> Cache:
        return self.programs.init_cache(batch, max_len)

    def cache_length(self, prompt_len: int, max_new_tokens: int, max_len: int | None) -> int:
        """Static cache length: room for the prompt bucket and every new token, within the context."""
        limit = max_len or self.config.max_seq_len
        if prompt_len + max_new_tokens > limit:
            raise LPJaxError(
                f"prompt of {prompt_len} tokens plus --max-new-tokens {max_new_tokens} does not fit the context of "
                f"{limit} tokens" + ("" if max_len else " (the model's max_position_embeddings)")
            )
        return min(limit, round_up(max(prefill_bucket(prompt_len), prompt_len + max_new_tokens), CACHE_MULTIPLE))

    def prefill(self, cache: Cache, prompts: list[list[int]], pad_id: int = 0):
        """Run the prompts (left-padded) through the model, filling the cache. Returns (last logits [B, V],
        cache, n, pad): n is the padded prompt length (the next cache slot), pad the left padding per row."""
        return self.programs.prefill(cache, prompts, pad_id)

    def decode_step(self, cache: Cache, tokens, index: int, pad) -> tuple[np.ndarray, Cache]:
        """One decode step called from the host: feed `tokens` [B] at cache slot `index`; returns (logits [B, V]
        on the host, new cache). The engine's own loop never does this per token; tests and latency probes do."""
        return self.step.logits(cache, tokens, index, pad)

    def next_token(self, cache: Cache, tokens, index: int, pad) -> tuple[np.ndarray, Cache]:
        """The same step with the greedy choice made on the device: only the next token ids [B] come back."""
        return self.step.next_token(cache, tokens, index, pad)

    def start_state(self, logits, n: int, pad: np.ndarray, max_new_tokens: int, sampling: Sampling, seed: int,
                    eos: tuple[int, ...]) -> DecodeState:
        """Decode-loop state after prefill: the first new token sampled from the prefill logits."""
        return decode_loop.start_state(self.programs, logits, n, pad, max_new_tokens, sampling, seed, eos)

    def decode(self, cache: Cache, state: DecodeState, sampling: Sampling, steps: int, eos: tuple[int, ...],
               pad_id: int) -> tuple[Cache, DecodeState]:
        """Run up to `steps` decode steps on device (stopping early when every row hit EOS or the budget)."""
        return decode_loop.decode(self.programs, cache, state, sampling, steps, eos, pad_id)

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
            count, done = int(self.programs.get(state.count)), self.programs.get(state.done)
            if on_tokens:
                on_tokens([list(map(int, r)) for r in self.programs.get(state.out)[:, :count]])
            if count >= max_new_tokens or bool(np.all(done)):
                break
            cache, state = self.decode(cache, state, sampling, steps, eos, pad_id)
        t2, c2 = time.perf_counter(), self.compile_s
        out, count = self.programs.get(state.out), int(self.programs.get(state.count))
        tokens = []
        for row in out[:, :count]:
            row = list(map(int, row))
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            tokens.append(row[: stop + 1] if stop is not None else row)
        return GenerationResult(tokens, n, (t1 - t0) - (c1 - c0), (t2 - t1) - (c2 - c1), count - 1,
                                self.compile_s - compile_start, len(prompts))
