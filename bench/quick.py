"""Quick single-process reading: decode ms/token and prefill ms for one model, several device counts and LP plans.

    python -m bench.quick [--model llama2-7b] [--devices 1,2,4] [--delta 0,14 | --lp 16:30] [--prefill 1024,4096]

Prints one JSON record per (device count, plan): `decode_ms` is the median over `--repeats` of ms per token for 128
tokens after the 128-token benchmark prompt in one on-device loop (after a warm-up run of the same shape);
`prefill_ms` the median latency of a prompt filling each bucket. The weights load once per device count; each plan
reuses them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax

from bench import common
from bench.common import log, model_prompt
from bench.records import DECODE_TOKENS, PROMPT_LEN
from lpjax.engine import Engine
from lpjax.plan import LPPlan, parse_deltas
from lpjax.sources import open_source
from lpjax.weights import DTYPES

NEW_TOKENS = DECODE_TOKENS + 1  # the first comes from prefill


def measure(engine: Engine, prefill_sizes: list[int], repeats: int) -> dict:
    prompt = model_prompt(PROMPT_LEN, engine.config)
    t = time.perf_counter()
    engine.generate([prompt], NEW_TOKENS, eos=())  # compile + warm-up with the timed shape
    first_call = time.perf_counter() - t
    decode = [engine.generate([prompt], NEW_TOKENS, eos=()).decode_ms_per_step for _ in range(repeats)]
    prefill = {}
    for n in prefill_sizes:
        long = model_prompt(n - 1, engine.config)  # n-1 tokens: bucket n, room for 1 new token
        prefill[n] = statistics.median(
            engine.generate([long], 1, eos=(), max_len=n).prefill_s * 1000 for _ in range(repeats))
    return dict(lp=engine.plan.spec(), delta=engine.plan.delta, decode_ms=statistics.median(decode),
                decode_all=decode, prefill_ms=prefill, devices=engine.layout.n_devices, first_call_s=first_call,
                attention=engine.attention)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b", help="a preset (random weights) or any model lpjax loads")
    p.add_argument("--devices", default="", help="comma-separated device counts (default: all)")
    p.add_argument("--delta", default="0,14", help="Δ values: paired layers ending two before the last")
    p.add_argument("--lp", default=None, metavar="START:END", help="an explicit plan instead of --delta")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median reported)")
    p.add_argument("--prefill", default="1024,4096", help="prompt buckets to time ('' = none)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    args = p.parse_args(argv)
    prefill_sizes = common.parse_ints(args.prefill, "--prefill", 2) if args.prefill else []
    device_counts = common.parse_ints(args.devices, "--devices", 1) if args.devices else [None]
    model = common.engine_model(args.model)
    plans = common.plans_for(open_source(model).config, parse_deltas(args.delta), args.lp)  # before any weight loads
    for devices in device_counts:
        base = Engine.load(model, "", devices, args.dtype)
        log(base.describe(), jax.__version__)
        for plan in plans:
            engine = base if plan == LPPlan(base.config.n_layers) else base.with_plan(plan.spec())
            print(json.dumps(measure(engine, prefill_sizes, args.repeats)), flush=True)
            del engine
        del base
    return 0


if __name__ == "__main__":
    sys.exit(common.exit_code(main))
