"""Where a single decode step's time goes when it is called from the host: dispatch (until the call returns),
device work (until the result is ready), and the copy of the logits to the host.

    python -m bench.step_latency [--model llama2-7b] [--devices 1] [--lp ''] [--calls 20]

Prints one JSON record of medians (ms). The engine's own decode loop pays dispatch once per generation; a
host-driven step pays it every token, so this says whether single-token latency is a host or a device problem.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from bench.records import PROMPT_LEN, prompt_ids
from lpjax.engine import Engine
from lpjax.model import DECODE, Positions


def measure(engine: Engine, calls: int) -> dict:
    prompts = [prompt_ids(PROMPT_LEN, engine.config.vocab_size)]
    cache = engine.init_cache(1, 2 * PROMPT_LEN)
    _, cache, n, pad = engine.prefill(cache, prompts)
    tokens = np.full(1, 5, np.int32)
    fwd = engine._forward(DECODE, cached=True, one_position=False)

    def step(params, cache, tokens, index, pad):
        logits, cache = fwd(params, tokens[:, None], Positions.step(pad, index), cache)
        return logits[:, 0], cache

    args = [engine._put(tokens), engine._put(np.int32(n)), engine._put(pad)]
    fn = jax.jit(step, donate_argnums=1).lower(engine.params, cache, *args).compile()
    for _ in range(2):  # the first executions set up buffers (and collectives)
        cache = jax.block_until_ready(fn(engine.params, cache, *args)[1])
    parts: dict[str, list[float]] = {"dispatch": [], "device": [], "to_host": [], "total": []}
    for _ in range(calls):
        t0 = time.perf_counter()
        logits, cache = fn(engine.params, cache, *args)
        t1 = time.perf_counter()
        jax.block_until_ready(logits)
        t2 = time.perf_counter()
        np.asarray(logits)
        t3 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            parts[k].append(1000 * v)
    return {k: round(statistics.median(v), 4) for k, v in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--lp", default="")
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    engine = Engine.load(f"random:{args.model}", args.lp, args.devices, None)
    print(json.dumps(dict(model=args.model, devices=args.devices, lp=args.lp, jax=jax.__version__,
                          leaves=len(jax.tree.leaves(engine.params)), **measure(engine, args.calls))), flush=True)


if __name__ == "__main__":
    main()
