"""On-device next-token sampling: greedy, temperature, top-k, top-p. Runs inside the jitted decode loop; `sample_rows`
is the row-wise version for a batch whose rows each have their own settings (a server's decode slots)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lpjax.errors import LPJaxError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """`temperature == 0` is greedy (argmax); `top_k == 0` and `top_p == 1` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise LPJaxError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise LPJaxError(f"--top-k {self.top_k}: must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise LPJaxError(f"--top-p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        parts = [f"temperature {self.temperature}"]
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.top_p < 1:
            parts.append(f"top-p {self.top_p}")
        return ", ".join(parts)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V]."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    neg = jnp.finfo(logits.dtype).min
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if s.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays): a token stays when the
        # mass before it is still below top_p
        keep = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def row_keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    """One PRNG key per row: row b's `counts[b]`-th draw of the stream seeded by `seeds[b]`. Stateless, so a
    request's samples depend on its own seed and position only, not on the other rows of the batch."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)


def sample_rows(logits: jax.Array, seeds: jax.Array, counts: jax.Array, temperature: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V], each row with its own settings (a server's decode slots):
    `temperature` [B] (0: the exact argmax, as `sample` is for greedy), `top_p` [B] (the most likely token always
    stays), and the key of `row_keys(seeds, counts)`."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = temperature > 0
    scaled = logits / jnp.where(hot, temperature, 1.0)[:, None]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]).at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled < threshold, jnp.finfo(scaled.dtype).min, scaled)
    drawn = jax.vmap(jax.random.categorical)(row_keys(seeds, counts), filtered).astype(jnp.int32)
    return jnp.where(hot, drawn, greedy)
