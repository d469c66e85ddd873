"""Decode slots for continuous batching, in JetStream's engine shape: prefill, insert, generate.

A static decode cache of `batch` rows; each row is a *slot* that holds one sequence at its own position, so
sequences join and leave the batch between calls without waiting for each other:

- `prefill`: one prompt through the model into a one-row cache of the decode cache's length (the same prefill
  program `Engine.generate` runs), and its first token sampled on the device;
- `insert`: that row copied into slot b of the decode cache (a `dynamic_update_slice` on the batch axis, the
  decode cache donated);
- `decode(k)`: k decode steps of every slot in one compiled program (a loop of static trip count, as
  `runtime.decode_loop` runs for `generate`), each row fed its own last token at its own cache slot
  (`Positions.index` [B]) and sampled on the device with its own settings and its own draw counter
  (`sampling.sample_rows`): only the ids [k, B] come back, in one transfer. `decode` is `collect(launch(k))`:
  a caller may launch the next call before it collects the last one's ids, so the device never waits on the host.

Why k steps a call: on H200 a host-called step costs far more than a step inside an on-device loop (SmolLM2-135M
2.30 ms against 0.99, Llama-2-7B 5.1 against 3.87: XLA updating and launching CUDA graphs on every call), so the
host pays that once per k tokens. A sequence's n-th token is the same whatever k (greedy exactly; sampled with the
key fold_in(key(seed), n)). Why launch ahead: the host's share of a call (reading the ids, handing them out, the
next call's dispatch) then overlaps the device's run of the next call instead of stalling it (NOTES: a host-called
step launched one ahead ran at the GPU's pace, 0.92 against 1.45 ms synchronous). Each call's last tokens stay on
the device as the next call's input; only a slot inserted since the last launch takes its token from the host. A
free slot below the last busy one still runs: it is fed a token at slot 0 of its own row, which the next `insert`
overwrites. A row's writes are clamped to the last cache slot, so a sequence that
ends inside a call (its caller discards the rest of the call's tokens) never writes past its row.

Why a call decodes only the first rows: a step of every row reads every row's cache, so the batch costs a step
whatever the load (Llama-2-7B at 32 slots x 256 tokens: 4.3 GB of cache a step beside 13.5 GB of weights; one
request on that server streamed at 0.65x `generate`'s speed on an H200). A call decodes rows [0, n), n the
smallest of `row_buckets` that covers the last busy slot, in a program compiled for n (the rows sliced out of the
donated cache and written back in place); `insert` fills the lowest free slot first, so a light load stays in the
small buckets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.cache import Cache
from lpjax.model import DECODE, Positions
from lpjax.runtime.host_step import greedy
from lpjax.runtime.programs import Programs
from lpjax.sampling import sample_rows
from lpjax.sharding import named

SEED_MOD = 1 << 32  # seeds are taken modulo 2**32 (a PRNG key's seed is 32 bits here)
BUCKET_GROWTH = 8  # decode programs for 1, 8, 64, ... rows and the whole batch: each is two compiles at start


def put_rows(cache: Cache, rows: Cache, at) -> Cache:
    """`rows` (a cache of fewer rows) written into `cache` from row `at` on ([stack, batch, ...]: the batch axis)."""
    return jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, at, axis=1), cache, rows)


def row_buckets(batch: int) -> tuple[int, ...]:
    """The row counts a decode call runs (each its own program): powers of BUCKET_GROWTH below `batch`, then
    `batch`."""
    out, n = [], 1
    while n < batch:
        out.append(n)
        n *= BUCKET_GROWTH
    return (*out, batch)


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """One sequence's sampling: `temperature` 0 is greedy (exact argmax); `top_p` 1 keeps every token; `seed` seeds
    the sequence's own random stream (its n-th token is drawn with key fold_in(key(seed), n))."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A launched decode call: its ids [k, rows] (on their way to the host) and the rows it ran."""

    ids: jax.Array
    rows: int


@dataclasses.dataclass
class Prefix:
    """A prompt prefilled into a one-row cache, to be inserted into a slot."""

    cache: Cache
    length: int  # prompt tokens: the cache slot of the next token
    first: int  # the first new token, sampled from the prefill's logits
    sampling: RowSampling


class Slots:
    """`batch` decode slots over a static cache of `max_len` tokens, on `programs`' mesh."""

    def __init__(self, programs: Programs, batch: int, max_len: int, pad_id: int = 0):
        if batch < 1:
            raise ValueError(f"batch {batch}: at least one slot")
        self.programs, self.batch, self.max_len, self.pad_id = programs, batch, max_len, pad_id
        self.cache = programs.init_cache(batch, max_len)
        self._rows: list[Cache] = []  # one-row caches free for the next prefill (donated to it, so reused in place)
        self.busy = np.zeros(batch, bool)
        self._tokens = np.zeros(batch, np.int32)  # a slot's token from the host (inserted or freed since the last call)
        self._fresh = np.ones(batch, bool)  # which slots take `_tokens`; the others the last call's ids, on device
        self._last = programs.put(np.zeros(batch, np.int32))  # the last call's last ids [batch], on the device
        self._index = np.zeros(batch, np.int32)  # the cache slot that token is written at
        self._count = np.zeros(batch, np.int32)  # tokens generated so far (the draw number of the next one)
        self._temperature = np.zeros(batch, np.float32)
        self._top_p = np.ones(batch, np.float32)
        self._seed = np.zeros(batch, np.uint32)

    def free_slots(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.busy)]

    # ---------------------------------------------------------------- prefill, insert, decode

    def prefill(self, prompt: list[int], sampling: RowSampling) -> Prefix:
        """Run `prompt` into a one-row cache and sample its first new token on the device."""
        n = len(prompt)
        if not 0 < n < self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit a cache of {self.max_len} (1 to {self.max_len - 1})")
        row = self._rows.pop() if self._rows else self.programs.init_cache(1, self.max_len)
        logits, row, _, _ = self.programs.prefill(row, [list(prompt)], self.pad_id)
        first = self._sample_first(logits, sampling)
        return Prefix(row, n, first, sampling)

    def insert(self, prefix: Prefix, slot: int) -> None:
        """Put a prefilled sequence into free slot `slot`: its next step feeds its first token after its prompt."""
        if self.busy[slot]:
            raise ValueError(f"slot {slot} is busy")
        p = self.programs
        args = (self.cache, prefix.cache, p.put(np.int32(slot)))
        fn = p.compile(("slot-insert", self.batch, self.max_len), self._build_insert, *args)
        self.cache = fn(*args)
        self._rows.append(prefix.cache)
        s = prefix.sampling
        self.busy[slot] = self._fresh[slot] = True
        self._tokens[slot], self._index[slot], self._count[slot] = prefix.first, prefix.length, 1
        self._temperature[slot], self._top_p[slot], self._seed[slot] = s.temperature, s.top_p, s.seed % SEED_MOD

    def release(self, slot: int) -> None:
        """Free `slot` (its sequence finished or was cancelled); the next call feeds it token 0 at slot 0. A call
        launched before still hands out the slot's ids (the caller knows whose they are)."""
        self.busy[slot], self._fresh[slot] = False, True
        self._tokens[slot] = self._index[slot] = self._count[slot] = 0
        self._temperature[slot], self._top_p[slot], self._seed[slot] = 0.0, 1.0, 0

    def rows_to_decode(self) -> int:
        """The rows a decode call runs: the smallest bucket that covers the last busy slot."""
        busy = np.flatnonzero(self.busy)
        last = int(busy[-1]) + 1 if busy.size else 1
        return next(n for n in row_buckets(self.batch) if n >= last)

    def decode(self, k: int) -> np.ndarray:
        """`k` decode steps of the slots, run now: `collect(launch(k))`."""
        return self.collect(self.launch(k))

    def launch(self, k: int) -> Chunk:
        """Start `k` decode steps of the slots in one program and return at once. Busy slots advance by k tokens;
        a row's ids from a step past the end of its cache (its index + step >= max_len) mean nothing: such steps
        rewrite the row's last cache slot. Greedy when no busy slot samples (no sort of the vocabulary). Only the
        first `rows_to_decode()` rows run."""
        if k < 1:
            raise ValueError(f"k {k}: at least one step")
        full = self.busy & (self._index >= self.max_len)
        if full.any():
            raise ValueError(f"slots {np.flatnonzero(full).tolist()} are at the end of the cache ({self.max_len})")
        p, n = self.programs, self.rows_to_decode()
        sampled = bool((self._temperature[self.busy] > 0).any())
        rows = np.stack([self._tokens, self._index, self._count, *(a.view(np.int32) for a in (
            self._seed, self._temperature, self._top_p)), self._fresh.astype(np.int32)])[:, :n]  # one transfer
        args = (p.params, self.cache, p.put(rows), self._last)
        fn = p.compile(("slot-decode", k, sampled, n, self.batch, self.max_len),
                       lambda: self._build_decode(k, sampled, n), *args)
        ids, self._last, self.cache = fn(*args)
        self._fresh[:n] = False
        self._index = self._index + k * self.busy
        self._count = self._count + k * self.busy
        return Chunk(ids, n)

    def collect(self, chunk: Chunk) -> np.ndarray:
        """A launched call's new token ids [k, B], step by step, once it has run (those of free slots, and of rows
        the call did not run, mean nothing)."""
        ids = np.asarray(self.programs.get(chunk.ids), np.int32)
        return np.pad(ids, ((0, 0), (0, self.batch - chunk.rows)))

    def warm_up(self, k: int) -> None:
        """Compile and run once every program a request meets (prefill of the smallest prompt bucket, the first
        token's sampler, insert, the greedy and the sampling `decode(k)` of each row bucket), so that the first
        requests do not wait on compiles. Leaves every slot free."""
        for n in row_buckets(self.batch):  # the bucket's last row busy: decode runs n rows
            self.insert(self.prefill([self.pad_id], RowSampling(temperature=1.0)), n - 1)
            self.decode(k)
            self._temperature[n - 1] = 0.0
            self.decode(k)
            self.release(n - 1)

    # ---------------------------------------------------------------- programs

    def _sample_first(self, logits: jax.Array, s: RowSampling) -> int:
        p = self.programs
        rows = (np.array([s.seed % SEED_MOD], np.uint32), np.zeros(1, np.int32),
                np.array([s.temperature], np.float32), np.array([s.top_p], np.float32))
        args = (logits, *(p.put(a) for a in rows))
        return int(p.get(p.compile(("slot-first",), lambda: jax.jit(sample_rows), *args)(*args))[0])

    def _build_insert(self):
        shardings = named(self.programs.mesh, self.programs.cache_specs)
        return jax.jit(put_rows, donate_argnums=0, out_shardings=shardings)

    def _build_decode(self, k: int, sampled: bool, n: int):
        """`run(params, cache, rows [7, n] int32: tokens, index, count, the bits of seed, temperature, top_p, and
        whether the token is fresh; last [batch]: the last call's last ids)` -> (ids [k, n], last, cache): a loop
        of k steps over the cache's first n rows, each fed its fresh token or else its last id; the cache and last
        are donated (the rows are written back in place), the ids go to pinned host memory on GPUs."""
        p, final, part = self.programs, self.max_len - 1, n < self.batch
        fwd = p.forward(DECODE, cached=True, one_position=False)

        def run(params, whole: Cache, rows: jax.Array, last: jax.Array):
            cache = jax.tree.map(lambda c: c[:, :n], whole) if part else whole  # [stack, batch, ...]
            tokens = jnp.where(rows[6] != 0, rows[0], last[:n])
            index, count, pad = rows[1], rows[2], jnp.zeros(n, jnp.int32)
            seeds = jax.lax.bitcast_convert_type(rows[3], jnp.uint32)
            temperature, top_p = (jax.lax.bitcast_convert_type(r, jnp.float32) for r in (rows[4], rows[5]))

            def step(j, carry):
                cache, tokens, out = carry
                at = jnp.minimum(index + j, final)  # a row past its end rewrites its last slot, never another's
                logits, cache = fwd(params, tokens[:, None], Positions.step(pad, at), cache)
                logits = logits[:, 0]
                nxt = sample_rows(logits, seeds, count + j, temperature, top_p) if sampled else greedy(logits)
                return cache, nxt, out.at[j].set(nxt)

            cache, tokens, out = jax.lax.fori_loop(0, k, step, (cache, tokens, jnp.zeros((k, n), jnp.int32)))
            last = jax.lax.dynamic_update_slice_in_dim(last, tokens, 0, axis=0)
            return out, last, put_rows(whole, cache, 0) if part else cache

        ids = NamedSharding(p.mesh, P(), memory_kind="pinned_host" if p.on_gpu else None)
        return jax.jit(run, donate_argnums=(1, 3),
                       out_shardings=(ids, NamedSharding(p.mesh, P()), named(p.mesh, p.cache_specs)))
