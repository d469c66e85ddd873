"""Quick single-process reading: decode ms/token and prefill ms for one model, several device counts and LP plans.

    python bench/quick.py [--model random:llama2-7b] [--devices 1,2,4] [--lp ,16:30] [--prefill 1024,4096]

Prints one JSON record per (device count, plan): `decode_ms` is the median over `--repeats` of ms per token for 128
tokens after a 128-token prompt in one on-device loop (after a warm-up run of the same shape); `prefill_ms` the
median latency of a prompt filling each bucket.
"""

import argparse
import json
import statistics
import sys
import time

import jax

from lpjax.engine import Engine

PROMPT = [1] + [100 + (i % 150) for i in range(127)]  # 128 tokens
NEW_TOKENS = 129  # the first comes from prefill: 128 decode steps


def measure(engine: Engine, prefill_sizes: list[int], repeats: int) -> dict:
    t = time.perf_counter()
    engine.generate([PROMPT], NEW_TOKENS, eos=())  # compile + warm-up with the timed shape
    first_call = time.perf_counter() - t
    decode = [engine.generate([PROMPT], NEW_TOKENS, eos=()).decode_ms_per_step for _ in range(repeats)]
    prefill = {}
    for n in prefill_sizes:
        long = [1] + [100 + (i % 150) for i in range(n - 2)]  # n-1 tokens: bucket n, room for 1 new token
        prefill[n] = statistics.median(
            engine.generate([long], 1, eos=(), max_len=n).prefill_s * 1000 for _ in range(repeats))
    return dict(lp=engine.plan.spec(), delta=engine.plan.delta, decode_ms=statistics.median(decode),
                decode_all=decode, prefill_ms=prefill, devices=engine.layout.n_devices, first_call_s=first_call,
                attention=engine.attention)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama2-7b")
    p.add_argument("--lp", default=",16:30", help="comma-separated plans ('' = sequential); ';' if plans hold commas")
    p.add_argument("--devices", default="", help="comma-separated device counts (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill", default="1024,4096", help="prompt buckets to time ('' = none)")
    args = p.parse_args()
    plans = args.lp.split(";") if ";" in args.lp else args.lp.split(",")
    prefill_sizes = [int(x) for x in args.prefill.split(",") if x]
    for devices in [int(d) for d in args.devices.split(",") if d] or [None]:
        base = Engine.load(args.model, "", devices, "bfloat16")
        print(base.describe(), jax.__version__, file=sys.stderr)
        for lp in plans:
            engine = base if lp == "" else base.with_plan(lp)
            print(json.dumps(measure(engine, prefill_sizes, args.repeats)), flush=True)
            del engine
        del base


if __name__ == "__main__":
    main()
