"""One decode step called from the host: a streaming chat's unit of work (and what single-token latency measures).

The step runs as a chain of programs of `span` stages each (`LlamaLM(span=(a, b))`). One program of a whole
Llama-2-7B step is one CUDA graph of ~490 kernels: on H200 that call returned only 1.5-2 ms after it began, the
GPU mostly idle meanwhile; a chain of programs of 4 stages each lets the GPU run the first while the host launches
the next (bench/NOTES.md, 2026-11-30). Every buffer stays put from call to call, which is what lets XLA replay its
CUDA graphs as they are: a graph one of whose buffers moved is updated first (a re-record of a whole step took
~0.4 ms). So the cache and the residual stream are donated and come back in place, and on GPUs the result is
written to pinned host memory rather than into a fresh device buffer each call.

A chain pays each program's host cost (argument handling, a CUDA-graph update and launch), so it pays only where
the GPU runs while the host launches the next program: on GPUs. Measured on H200, bf16, batch 1 (bench/NOTES.md,
2026-11-30 and 2026-12-01): Llama-2-7B on 1 GPU 4.6 ms a step in programs of 4 stages against 5.3 in one;
SmolLM2-135M on 1 GPU 1.50 against 2.10; Llama-2-7B on 2 GPUs 4.2-4.3 against 4.9-5.3 (programs of 2 stages 4.4,
of 8 4.8). `default_span` says which.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.cache import Cache
from lpjax.model import DECODE, Positions, stream_rows
from lpjax.runtime.programs import Programs, cache_shape
from lpjax.sharding import named

STEP_SPAN = 4  # stages per program of a chain


def default_span(programs: Programs) -> int | None:
    """`STEP_SPAN` stages per program on GPUs; otherwise the whole step as one program (None): off GPUs the host
    waits on each program anyway."""
    return STEP_SPAN if programs.on_gpu else None


def greedy(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class HostStep:
    """Host-called decode steps over `programs`: `span` stages per program (None: the whole step in one
    program; "auto": `default_span`); `pinned`: the result goes to pinned host memory on GPUs."""

    def __init__(self, programs: Programs, span: int | str | None = "auto", pinned: bool = True):
        self.programs = programs
        if span == "auto":
            span = default_span(programs)
        self.span = span or len(programs.layout.stages)
        self.pinned = pinned and programs.on_gpu
        self._chains: dict = {}  # per key: [(stage names, their params, program)]
        self._streams: dict[int, jax.Array] = {}  # the residual stream buffer handed along a chain, per batch size
        self._held: dict[int, tuple[np.ndarray, jax.Array]] = {}  # per batch size: next step's ids (host, device)

    def logits(self, cache: Cache, tokens, index: int, pad) -> tuple[np.ndarray, Cache]:
        """Feed `tokens` [B] at cache slot `index`; returns (logits [B, V] on the host, the new cache)."""
        return self.run("step", lambda logits: logits, cache, tokens, index, pad)

    def next_token(self, cache: Cache, tokens, index: int, pad) -> tuple[np.ndarray, Cache]:
        """The same step with the greedy choice made on the device: only the next token ids [B] come back to the
        host, not [B, V] float32 logits (128 KB a row for a 32k vocabulary: ~0.46 ms on H200, bench/NOTES.md)."""
        return self.run("next", greedy, cache, tokens, index, pad)

    def run(self, name: str, post: Callable, cache: Cache, tokens, index: int, pad) -> tuple[np.ndarray, Cache]:
        """One step: `tokens` [B] fed at cache slot `index`, then `post(logits [B, V])` on device; returns its
        result on the host and the new cache (donated). The ids go up as one array [tokens (B), pad (B), index],
        unless the device already holds them (`_ids`)."""
        p = self.programs
        tokens = np.asarray(tokens, np.int32)
        B = len(tokens)
        host_ids = np.concatenate([tokens, np.asarray(pad, np.int32), [index]]).astype(np.int32)
        feeds = name == "next"  # its last program also leaves the next step's ids on the device
        key = (name, B, cache_shape(cache), self.span, self.pinned)
        chain = self._chain(key, post, B, cache, feeds)
        # the warm-up writes the same cache slot the real run then writes again
        cache = p.first_run(key, cache, lambda c: self._run_chain(chain, B, c, p.put(host_ids))[2])
        out, next_ids, cache = self._run_chain(chain, B, cache, self._ids(B, host_ids, feeds))
        out = p.get(out)
        if feeds:
            self._held[B] = (np.concatenate([out, host_ids[B:2 * B], [index + 1]]).astype(np.int32), next_ids)
        return out, cache

    def _ids(self, batch: int, host_ids: np.ndarray, donated: bool) -> jax.Array:
        """The step's ids on the device: those the last `next_token` left there when they are what the host asks
        for (a stream feeding back the token it was handed, one slot on), else an upload. The upload is on the
        step's critical path: ~0.2 ms of a host-called Llama-2-7B step on H200 (bench/NOTES.md, 2026-12-01).
        A step that donates them takes them out, so a call that fails leaves no deleted buffer behind."""
        held = self._held.pop(batch, None) if donated else self._held.get(batch)
        if held is not None and np.array_equal(held[0], host_ids):
            return held[1]
        return self.programs.put(host_ids)

    def _take_stream(self, batch: int) -> jax.Array:
        """The residual-stream buffer (donated along the chain, so it stays put), taken out while a call holds it:
        a call that fails leaves no deleted buffer behind."""
        stream = self._streams.pop(batch, None)
        return stream if stream is not None else self.programs.put(
            np.zeros((stream_rows(batch, 1), 1, self.programs.config.dim), self.programs.dtype))

    def _chain(self, key: tuple, post: Callable, batch: int, cache: Cache, feeds: bool) -> list:
        """The programs of a step, compiled once per key. Program i runs `span` stages;
        `prog(params, stream, ids, cache)` returns (the stream, and its stages' new cache); the last returns
        `post(logits)` instead of the stream, and with `feeds` (post gives the next token ids) it also returns
        the next step's ids [post's result, pad, index + 1], written over the ids it was handed."""
        if key in self._chains:
            return self._chains[key]
        p, B = self.programs, batch
        stages = p.layout.stages
        stage_names = {s.name for s in stages}
        shared = [k for k in p.params if k not in stage_names]  # embedding, final norm, LM head
        stream, ids = self._take_stream(B), p.put(np.zeros(2 * B + 1, np.int32))
        chain = []
        for start in range(0, len(stages), self.span):
            stop = min(start + self.span, len(stages))
            first, last = start == 0, stop == len(stages)
            names = [s.name for s in stages[start:stop]]
            params = {k: p.params[k] for k in names + (shared if first or last else [])}
            cache_specs = {k: p.cache_specs[k] for k in names}
            model = p.local_model(span=(start, stop))

            def body(params, stream, ids, cache, model=model, first=first, last=last):
                pos = Positions.step(ids[B:2 * B], ids[2 * B])
                out, cache = model.apply({"params": params}, ids[:B, None] if first else stream, pos, cache, DECODE)
                if not last:
                    return out, cache
                result = post(out[:, 0])
                if feeds:
                    return result, jnp.concatenate([result, ids[B:2 * B], ids[2 * B:] + 1]), cache
                return result, cache

            def build(body=body, params=params, cache_specs=cache_specs, last=last):
                fed = last and feeds
                fn = jax.shard_map(body, mesh=p.mesh, in_specs=({k: p.param_specs[k] for k in params}, P(), P(),
                                                                 cache_specs),
                                   out_specs=(P(),) * (1 + fed) + (cache_specs,), check_vma=False)
                pinned = last and self.pinned
                result = NamedSharding(p.mesh, P(), memory_kind="pinned_host") if pinned else None
                outs = (result,) + (NamedSharding(p.mesh, P()),) * fed + (named(p.mesh, cache_specs),)
                # keep_unused: the first program never reads the stream it is handed; jax would drop that
                # donation, and the stream it returns would land at a new address each call, so every later
                # program's CUDA graph would be updated (XLA compares the buffers' addresses on every call).
                # The fed ids are donated for the same reason: they come back where they were.
                donated = (2,) * fed + (3,) if last else (1, 3)
                return jax.jit(fn, donate_argnums=donated, keep_unused=True, out_shardings=outs if pinned else None)

            sub_cache = {k: cache[k] for k in names}
            chain.append((names, params, p.compile(key + (start,), build, params, stream, ids, sub_cache)))
        self._streams[B] = stream
        self._chains[key] = chain
        return chain

    def _run_chain(self, chain: list, B: int, cache: Cache, ids: jax.Array):
        """One step of `B` rows through `chain`: (the last program's result, the next step's ids where the chain
        feeds them, else None, the new cache)."""
        cache, stream = dict(cache), self._take_stream(B)
        for i, (names, params, program) in enumerate(chain):
            last = i == len(chain) - 1
            out, *fed, new = program(params, stream, ids, {k: cache[k] for k in names})
            cache.update(new)
            if not last:
                stream = out
        self._streams[B] = stream
        return out, (fed[0] if fed else None), cache
