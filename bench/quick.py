"""Quick single-process reading: decode ms/token and prefill ms for one model over several LP plans."""
import argparse, json, statistics, sys, time

import jax

from lpjax.engine import Engine

p = argparse.ArgumentParser()
p.add_argument("--model", default="random:llama2-7b")
p.add_argument("--lp", default=",16:30")
p.add_argument("--devices", default="", help="comma-separated device counts (default: all)")
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--prefill", default="1024,4096")
args = p.parse_args()
prompt = [1] + [100 + (i % 150) for i in range(127)]
out = []
for devices in [int(d) for d in args.devices.split(",") if d] or [None]:
  base = Engine.load(args.model, "", devices, "bfloat16")
  print(base.describe(), jax.__version__, file=sys.stderr)
  for lp in args.lp.split(";") if ";" in args.lp else args.lp.split(","):
    e = base if lp == "" else base.with_plan(lp)
    t = time.perf_counter(); e.generate([prompt], 129, eos=()); warm = time.perf_counter() - t
    dec = [e.generate([prompt], 129, eos=()).decode_ms_per_step for _ in range(args.repeats)]
    pre = {}
    for n in [int(x) for x in args.prefill.split(",") if x]:
        long = [1] + [100 + (i % 150) for i in range(n - 2)]  # n-1 tokens: bucket n, room for 1 new token
        runs = [e.generate([long], 1, eos=(), max_len=n).prefill_s * 1000 for _ in range(args.repeats)]
        pre[n] = statistics.median(runs)
    rec = dict(lp=lp, delta=e.plan.delta, decode_ms=statistics.median(dec), decode_all=dec, prefill_ms=pre,
               devices=e.layout.n_devices, first_call_s=warm, attention=e.attention)
    print(json.dumps(rec), flush=True)
    out.append(rec)
    if e is not base:
        del e
  del base
