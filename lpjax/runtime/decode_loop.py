"""Decode as one on-device loop: feed the last token, sample on the device, stop at EOS or the token budget.

The host sees only the loop's result (or a chunk of it, for streaming). The loop is a `while_loop` over groups of
`STEPS_PER_CHECK` steps, each group a loop of static trip count: XLA evaluates a `while_loop`'s condition on the
device and copies it to the host before every iteration, while a loop of known trip count runs with no such
round trip. So the host checks "done?" once a group, not once a token; steps of a group after the loop is done
change nothing but the next cache slot, which the next real step writes again before it reads it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lpjax.cache import Cache
from lpjax.model import DECODE, Positions
from lpjax.runtime.programs import Programs, cache_shape
from lpjax.sampling import Sampling, sample

STEPS_PER_CHECK = 8


def eos_array(eos: tuple[int, ...]) -> jax.Array:
    """EOS ids as an array for `jnp.isin` (-1, which no token is, when there are none)."""
    return jnp.array(eos or (-1,), jnp.int32)


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


def start_state(programs: Programs, logits, n: int, pad: np.ndarray, max_new_tokens: int, sampling: Sampling,
                seed: int, eos: tuple[int, ...]) -> DecodeState:
    """Decode-loop state after prefill: the first new token sampled from the prefill logits."""
    B = logits.shape[0]

    def start(logits, key_data, pad, n):
        key, sub = jax.random.split(jax.random.wrap_key_data(key_data))
        first = sample(logits, sub, sampling)
        out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, eos_array(eos))
        return DecodeState(out=out, done=done, key=key, count=jnp.int32(1), index=n, pad=pad)

    args = (logits, programs.put(jax.random.key_data(jax.random.key(seed))), programs.put(pad),
            programs.put(np.int32(n)))
    fn = programs.compile(("start", B, max_new_tokens, sampling, tuple(eos)), lambda: jax.jit(start), *args)
    return fn(*args)


def _loop(programs: Programs, sampling: Sampling, steps: int, eos: tuple[int, ...], pad_id: int, per_check: int,
          unroll: bool):
    fwd = programs.forward(DECODE, cached=True, one_position=False)
    eos_ids = eos_array(eos)

    def loop(params, cache: Cache, state: DecodeState):
        limit = jnp.minimum(state.count + steps, state.out.shape[1])

        def live(st: DecodeState):
            return (st.count < limit) & ~jnp.all(st.done)

        def step(_, carry):
            cache, st = carry
            token = jax.lax.dynamic_index_in_dim(st.out, st.count - 1, axis=1, keepdims=False)
            logits, cache = fwd(params, token[:, None], Positions.step(st.pad, st.index), cache)
            key, sub = jax.random.split(st.key)
            nxt = jnp.where(st.done, pad_id, sample(logits[:, 0], sub, sampling))
            out = jax.lax.dynamic_update_slice_in_dim(st.out, nxt[:, None], st.count, axis=1)
            new = st.replace(out=out, done=st.done | jnp.isin(nxt, eos_ids), key=key, count=st.count + 1,
                             index=st.index + 1)
            go = live(st)
            return cache, jax.tree.map(lambda a, b: jnp.where(go, a, b), new, st)

        def group(carry):
            return jax.lax.fori_loop(0, per_check, step, carry, unroll=unroll)

        return jax.lax.while_loop(lambda carry: live(carry[1]), group, (cache, state))

    return loop


def decode(programs: Programs, cache: Cache, state: DecodeState, sampling: Sampling, steps: int,
           eos: tuple[int, ...], pad_id: int, per_check: int = STEPS_PER_CHECK,
           unroll: bool = False) -> tuple[Cache, DecodeState]:
    """Run up to `steps` decode steps on device (stopping early when every row hit EOS or the budget); the cache
    and the state are donated. `unroll` writes a group's steps out as straight-line code (one program body of
    `per_check` steps: more to compile, nothing between the steps)."""
    key = ("decode", sampling, steps, tuple(eos), pad_id, per_check, unroll, state.out.shape, cache_shape(cache))
    loop = _loop(programs, sampling, steps, eos, pad_id, per_check, unroll)
    fn = programs.compile(key, lambda: jax.jit(loop, donate_argnums=(1, 2)), programs.params, cache, state)

    def one_step(c):  # on a copy of the state (it is donated), at the cache slot the real run writes first
        scratch = jax.tree.map(jnp.copy, state)
        scratch = scratch.replace(count=jnp.maximum(scratch.count, state.out.shape[1] - 1))
        return fn(programs.params, c, scratch)[0]

    cache = programs.first_run(key, cache, one_step)
    return fn(programs.params, cache, state)
