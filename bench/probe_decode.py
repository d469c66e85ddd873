"""Decode-loop and host-called-step variants of one model, side by side in one process (a lab probe).

    python -m bench.probe_decode --model smollm2-135m [--devices 1] [--lp ''] [--groups 1,8,32] [--unroll 8]
        [--spans 4,all] [--attention auto,pallas] [--out FILE]

For each decode-loop group size (`decode_loop.STEPS_PER_CHECK`: steps per condition check) it times decode as
`bench.run` does (ms/token over DECODE_TOKENS after a PROMPT_LEN prompt, median of 3 after a warm-up); `--unroll`
adds those group sizes with the group's steps unrolled. For each host-step span (stages per program; `all` = one
program) it times `next_token` host to host (median of SINGLE_TOKEN_CALLS after warm-up). Each of `--attention`'s
kernels (`Engine`'s `attention`) gets an engine of its own and every figure. One JSON line per figure, with the
XLA flags of the process, so runs under different flags can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from bench.common import prompt_ids
from bench.records import DECODE_TOKENS, PROMPT_LEN, SINGLE_TOKEN_AT
from lpjax.engine import Engine
from lpjax.runtime import decode_loop
from lpjax.runtime.host_step import HostStep
from lpjax.sampling import Sampling

REPEATS, CALLS = 3, 20


def decode_ms(engine: Engine, group: int, unroll: bool) -> list[float]:
    """ms/token of the on-device loop with `group` steps per condition check."""
    prompt = [prompt_ids(PROMPT_LEN, engine.config.vocab_size)]
    tokens = DECODE_TOKENS + 1
    L = engine.cache_length(PROMPT_LEN, tokens, None)
    out = []
    for i in range(REPEATS + 1):
        cache = engine.init_cache(1, L)
        logits, cache, n, pad = engine.prefill(cache, prompt)
        state = engine.start_state(logits, n, pad, tokens, Sampling(), 0, ())
        jax.block_until_ready(state.out)
        # compile + warm outside the timing: decode() compiles and runs its first step before the timed call
        c0 = engine.compile_s
        t0 = time.perf_counter()
        cache, state = decode_loop.decode(engine.programs, cache, state, Sampling(), tokens, (), 0, group, unroll)
        jax.block_until_ready(state.out)
        t = time.perf_counter() - t0 - (engine.compile_s - c0)
        if i:
            out.append(1000 * t / (tokens - 1))
    return out


def step_ms(engine: Engine, span: int | None) -> list[float]:
    cache = engine.init_cache(1, engine.cache_length(SINGLE_TOKEN_AT, DECODE_TOKENS, None))
    _, cache, n, pad = engine.prefill(cache, [prompt_ids(SINGLE_TOKEN_AT, engine.config.vocab_size)])
    step = HostStep(engine.programs, span=span)
    tokens, out = np.full(1, 5, np.int32), []
    for i in range(CALLS + 2):
        t0 = time.perf_counter()
        tokens, cache = step.next_token(cache, tokens, n + i, pad)
        if i >= 2:
            out.append(1000 * (time.perf_counter() - t0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--lp", default="")
    p.add_argument("--groups", default="1,8,32")
    p.add_argument("--unroll", default="", help="group sizes to time unrolled too")
    p.add_argument("--spans", default="4,all", help="host-step spans (stages per program; all = one program)")
    p.add_argument("--attention", default="auto", help="attention kernels to time, each in turn (auto, pallas, ...)")
    p.add_argument("--label", default="", help="a name for this process's settings (e.g. its XLA flags)")
    p.add_argument("--out", default=None, help="append the JSON lines here too")
    args = p.parse_args()
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):  # one process per device, started by hand (a lab probe)
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))

    def emit(base, **rec):
        line = json.dumps(dict(base, **rec, median=round(statistics.median(rec["samples"]), 4)))
        if jax.process_index() == 0:
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")

    for attention in args.attention.split(","):
        engine = Engine.load(f"random:{args.model}", args.lp, args.devices, None, attention=attention)
        base = dict(model=args.model, devices=args.devices, lp=args.lp, label=args.label, jax=jax.__version__,
                    xla_flags=os.environ.get("XLA_FLAGS", ""), device=engine.mesh.devices.flat[0].device_kind,
                    processes=jax.process_count(), attention=engine.attention)
        for g in [int(x) for x in args.groups.split(",") if x]:
            emit(base, metric="decode", group=g, unroll=False, samples=decode_ms(engine, g, False))
        for g in [int(x) for x in args.unroll.split(",") if x]:
            emit(base, metric="decode", group=g, unroll=True, samples=decode_ms(engine, g, True))
        for s in [x for x in args.spans.split(",") if x]:
            emit(base, metric="single_token", span=s, samples=step_ms(engine, None if s == "all" else int(s)))
        del engine  # its weights, before the next engine loads its own


if __name__ == "__main__":
    main()
