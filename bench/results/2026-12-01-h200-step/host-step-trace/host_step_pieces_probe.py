"""Probe: where a host-called step's host time goes (ids up, each program's dispatch, the result back), and what
other ways of sending the ids up cost. Random weights, 1 GPU, batch 1, cache slot 256."""

import json
import statistics
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench.common import prompt_ids
from lpjax.engine import Engine

name = sys.argv[1]
eng = Engine.load(f"random:{name}", "", 1)
cache = eng.init_cache(1, 512)
_, cache, n, pad = eng.prefill(cache, [prompt_ids(256, eng.config.vocab_size)])
state = {"cache": cache}
p, step = eng.programs, eng.step
ids_np = np.array([5, 0, n], np.int32)
sharding = NamedSharding(p.mesh, P())


def med(f, calls=300):
    for _ in range(20):
        f()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e6)
    return round(statistics.median(ts), 1)


rep = {"model": name, "jax": jax.__version__}
rep["put (make_array_from_callback)_us"] = med(lambda: jax.block_until_ready(p.put(ids_np)))
rep["put (device_put, cached sharding)_us"] = med(lambda: jax.block_until_ready(jax.device_put(ids_np, sharding)))
rep["put (device_put to device 0)_us"] = med(lambda: jax.block_until_ready(jax.device_put(ids_np, jax.devices()[0])))
rep["put, not waited (callback)_us"] = med(lambda: p.put(ids_np))
rep["put, not waited (device_put)_us"] = med(lambda: jax.device_put(ids_np, sharding))


def next_token():
    tokens, state["cache"] = eng.next_token(state["cache"], np.array([5], np.int32), n, np.array([0], np.int32))


rep["next_token (engine)_us"] = med(next_token, 100)
orig_put = p.put
p.put = lambda x: jax.device_put(np.asarray(x), sharding)
rep["next_token, device_put ids_us"] = med(next_token, 100)
fixed = orig_put(ids_np)
p.put = lambda x: fixed
rep["next_token, ids already up_us"] = med(next_token, 100)
p.put = orig_put

# the chain's pieces, by hand: dispatch of each program, and the wait for the result
key = next(k for k in step._chains if k[0] == "next")
chain = step._chains[key]
parts = {f"dispatch {i}": [] for i in range(len(chain))} | {"get": [], "put": []}
for _it in range(120):
    t0 = time.perf_counter()
    ids = p.put(ids_np)
    t1 = time.perf_counter()
    parts["put"].append(t1 - t0)
    c, stream = dict(state["cache"]), step._take_stream(1)
    for i, (names, params, program) in enumerate(chain):
        t = time.perf_counter()
        out, new = program(params, stream, ids, {k: c[k] for k in names})
        parts[f"dispatch {i}"].append(time.perf_counter() - t)
        c.update(new)
        if i < len(chain) - 1:
            stream = out
    step._streams[1] = stream
    state["cache"] = c
    t = time.perf_counter()
    p.get(out)
    parts["get"].append(time.perf_counter() - t)
rep["pieces_us"] = {k: round(statistics.median(v[20:]) * 1e6, 1) for k, v in parts.items()}
rep["decode_loop_ms"] = round(eng.generate([prompt_ids(256, eng.config.vocab_size)], 129, eos=()).decode_ms_per_step, 4)
print(json.dumps(rep), flush=True)
