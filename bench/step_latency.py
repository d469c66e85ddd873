"""Why a host-called decode step runs as a chain of programs: the same step three ways, host to host.

    python -m bench.step_latency [--model llama2-7b] [--devices 1] [--lp ''] [--repeats 20]

Each call sends the token ids up, runs one decode step with the greedy choice on the device and brings the next ids
back (records.SINGLE_TOKEN's definition). Prints one JSON record of medians in ms:
- `one_program`: the whole step as one XLA program, its result a fresh device buffer each call;
- `one_program_pinned_out`: the same program writing its result to pinned host memory (GPUs only);
- `engine`: `Engine.next_token`, a chain of programs of `engine.STEP_SPAN` stages whose buffers stay put;
and `one_program_dispatch`: host time until the one-program call returns, before the result is waited for.
On one H200 (Llama-2-7B, bench/NOTES.md, 2026-11-30) the one program's CUDA graph was re-recorded on every call (its
output buffer moved) and the call returned only after ~2 ms: 6.18 / 5.20 / 4.63 ms for the three.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench.common import prompt_ids
from bench.records import SINGLE_TOKEN_AT
from lpjax.engine import Engine
from lpjax.model import DECODE, Positions


def one_program(engine: Engine, cache, pinned_out: bool):
    """The step as one jitted program over the whole model: `run(cache, ids) -> (token ids, cache)`."""
    fwd = engine._forward(DECODE, cached=True, one_position=False)

    def step(params, cache, ids):
        logits, cache = fwd(params, ids[:1, None], Positions.step(ids[1:2], ids[2]), cache)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    out = NamedSharding(engine.mesh, P(), memory_kind="pinned_host") if pinned_out else None
    shardings = (out, jax.tree.map(lambda x: x.sharding, cache)) if pinned_out else None
    ids = engine._put(np.zeros(3, np.int32))
    fn = jax.jit(step, donate_argnums=1, out_shardings=shardings).lower(engine.params, cache, ids).compile()
    return lambda cache, ids: fn(engine.params, cache, ids)


def timed(calls: int, call) -> tuple[list[float], list[float]]:
    """Host-to-host ms of `calls` calls after 3 warm ones; `call(tokens) -> (device token ids, seconds to dispatch)`."""
    total, dispatch = [], []
    tokens = np.full(1, 5, np.int32)
    for i in range(calls + 3):
        t0 = time.perf_counter()
        out, d = call(tokens)
        tokens = np.asarray(out.addressable_data(0) if isinstance(out, jax.Array) else out).astype(np.int32)
        if i >= 3:
            total.append(1000 * (time.perf_counter() - t0))
            dispatch.append(1000 * d)
    return total, dispatch


def measure(engine: Engine, calls: int) -> dict:
    cache = engine.init_cache(1, 2 * SINGLE_TOKEN_AT)
    _, cache, n, pad = engine.prefill(cache, [prompt_ids(SINGLE_TOKEN_AT, engine.config.vocab_size)])
    state = {"cache": cache}
    report = {}

    def via(run):
        def call(tokens):
            ids = engine._put(np.array([tokens[0], pad[0], n], np.int32))
            t0 = time.perf_counter()
            out, state["cache"] = run(state["cache"], ids)
            return out, time.perf_counter() - t0
        return call

    variants = {"one_program": False}
    if engine.mesh.devices.flat[0].platform == "gpu":
        variants["one_program_pinned_out"] = True
    for name, pinned in variants.items():
        total, dispatch = timed(calls, via(one_program(engine, state["cache"], pinned)))
        report[name] = statistics.median(total)
        if name == "one_program":
            report["one_program_dispatch"] = statistics.median(dispatch)

    def engine_call(tokens):
        out, state["cache"] = engine.next_token(state["cache"], tokens, n, pad)
        return out, 0.0

    report["engine"] = statistics.median(timed(calls, engine_call)[0])
    return {k: round(v, 4) for k, v in report.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--lp", default="")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each variant (median reported)")
    args = p.parse_args()
    engine = Engine.load(f"random:{args.model}", args.lp, args.devices, None)
    print(json.dumps(dict(model=args.model, devices=args.devices, lp=args.lp, jax=jax.__version__,
                          device=engine.mesh.devices.flat[0].device_kind, **measure(engine, args.repeats))), flush=True)


if __name__ == "__main__":
    main()
