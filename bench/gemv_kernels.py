"""Tune and check the decode GEMV kernel (`lpjax.kernels`) against XLA's product on decode shapes.

    python -m bench.gemv_kernels [--quick] [--json-out FILE]

For each [K, N] weight of Llama-2-7B / Llama-3.2-3B decode (1 and 2 GPUs): XLA's padded product (what
`model.project` runs without the kernel), then the kernel over a grid of block sizes, each checked against a
float32 reference (relative error < 1e-2) before it is timed. Timing: one jitted program applies the GEMV to
enough distinct weights to move >= 1 GB (far past the 60 MB L2); after a warm-up, the GPU kernel time of the
repeats from the profiler (launch gaps excluded), divided by the repeats and the count; bandwidth counts the
weight bytes. Ends with the copy bandwidth ceiling and a table of the best per shape.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from bench.profile import kernel_events
from lpjax import kernels
from lpjax.model import project

SHAPES = {  # name: (K, N)
    "7b qkv": (4096, 12288), "7b wo": (4096, 4096), "7b gate_up": (4096, 22016), "7b down": (11008, 4096),
    "7b/2 qkv": (4096, 6144), "7b/2 wo": (2048, 4096), "7b/2 gate_up": (4096, 11008), "7b/2 down": (5504, 4096),
    "3b qkv": (3072, 5120), "3b wo": (3072, 3072), "3b gate_up": (3072, 16384), "3b down": (8192, 3072),
    "7b lm_head": (4096, 32000),
}
TUNE = ("7b wo", "7b down", "7b/2 wo")  # shapes that get the full block grid
BYTES_PER_CALL = 1 << 30


def timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def device_time(fn, args, repeats: int) -> float:
    """Seconds of GPU kernel time per call (the profiler's kernel durations, launch gaps excluded)."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as out:
        jax.profiler.start_trace(out)
        for _ in range(repeats):
            jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        trace = glob.glob(f"{out}/**/*.xplane.pb", recursive=True)[0]
        events = next(iter(kernel_events(trace).values()))
    return sum(d for _, _, d in events) / 1e9 / repeats


def copy_bandwidth() -> float:
    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda x: x + 1)
    return 2 * x.nbytes / timed(f, (x,), 10) / 1e12


def bench_shape(K: int, N: int, configs, repeats: int, prologue=None) -> list[dict]:
    count = max(4, BYTES_PER_CALL // (K * N * 2))
    key = jax.random.key(K * 7 + N)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.bfloat16) for i in range(count)]
    xw = 2 * K if prologue == "swiglu" else K
    x = jax.random.normal(jax.random.fold_in(key, 1 << 20), (xw,), jnp.bfloat16)
    scale = (1 + 0.1 * jax.random.normal(jax.random.fold_in(key, 1 << 21), (K,))).astype(jnp.bfloat16)
    if prologue == "rmsnorm":
        xin = (x.astype(jnp.float32) * jax.lax.rsqrt(jnp.mean(x.astype(jnp.float32) ** 2) + 1e-5)).astype(x.dtype)
        xin = scale * xin
    elif prologue == "swiglu":
        xin = jax.nn.silu(x[:K]) * x[K:]
    else:
        xin = x
    ref = xin.astype(jnp.float32) @ ws[0].astype(jnp.float32)
    transposed = None
    rows = []
    for name, layout, cfg in configs:
        if layout == "xla":
            one = lambda x, w: project(xin[None], w)[0]  # noqa: E731  (XLA: padded GEMM, transform outside)
        elif layout == "kn":
            if N % cfg.bn or K % (cfg.splits * cfg.bk):
                continue
            one = lambda x, w, cfg=cfg: kernels.gemv(x, w, prologue=prologue, scale=scale, eps=1e-5, config=cfg)  # noqa: E731
        else:
            if N % cfg.bn or K % cfg.bk:
                continue
            one = lambda x, w, cfg=cfg: kernels.gemv_nk(x, w, prologue=prologue, scale=scale, eps=1e-5, config=cfg)  # noqa: E731
        if layout == "nk" and transposed is None:
            transposed = [jnp.asarray(w.T) for w in ws]
        weights = transposed if layout == "nk" else ws
        try:
            got = jax.jit(one)(x, weights[0]).astype(jnp.float32)
            err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
            if not err < 1e-2:
                rows.append(dict(K=K, N=N, variant=name, error=err, us=None))
                continue
            fn = jax.jit(lambda x, ws, one=one: [one(x, w) for w in ws])
            t = device_time(fn, (x, weights), repeats) / count
        except Exception as e:  # a config Triton rejects (registers, shared memory) is reported, not fatal
            rows.append(dict(K=K, N=N, variant=name, error=f"{type(e).__name__}: {str(e)[:200]}", us=None))
            continue
        rows.append(dict(K=K, N=N, variant=name, error=err, us=t * 1e6, tbps=K * N * 2 / t / 1e12,
                         prologue=prologue))
        print(f"  K={K:5d} N={N:5d} {name:40s} {t * 1e6:7.1f} us {K * N * 2 / t / 1e12:5.2f} TB/s err {err:.1e}",
              flush=True)
    return rows


def grid(K: int, N: int, quick: bool):
    """(name, layout, blocks): XLA, the [K, N] kernel and the [N, K] kernel."""
    out = [("xla padded", "xla", None), ("kn default", "kn", kernels.blocks(K, N)),
           ("nk default", "nk", kernels.blocks_nk(K, N))]
    if quick:
        return out
    for bn, bk, target, warps in itertools.product((128, 256), (32, 64), (1024, 4096), (4, 8)):
        b = kernels.blocks(K, N, bn=bn, bk=bk, target=target, warps=warps)
        out.append((f"kn bn{b.bn} bk{b.bk} s{b.splits} w{b.warps} st{b.stages}", "kn", b))
    for bn, bk, warps, stages in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (2, 3, 4)):
        if stages != 3 and (bn, bk) not in ((8, 512), (16, 256)):
            continue
        b = kernels.blocks_nk(K, N, bn=bn, bk=bk, warps=warps, stages=stages)
        out.append((f"nk bn{b.bn} bk{b.bk} w{b.warps} st{b.stages}", "nk", b))
    seen = {}
    for name, layout, b in out:  # one of each (several asks can give the same blocks)
        seen.setdefault(name, (name, layout, b))
    return list(seen.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only XLA and the default blocks")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    ceiling = copy_bandwidth()
    print(f"copy bandwidth {ceiling:.2f} TB/s (read + write)", flush=True)
    rows = []
    for name, (K, N) in SHAPES.items():
        print(name, flush=True)
        rows += [dict(r, shape=name) for r in bench_shape(K, N, grid(K, N, args.quick or name not in TUNE),
                                                           args.repeats)]
    for prologue in ("rmsnorm", "swiglu"):
        K, N = SHAPES["7b gate_up" if prologue == "rmsnorm" else "7b down"]
        print(f"prologue {prologue}", flush=True)
        rows += [dict(r, shape=f"{prologue}") for r in bench_shape(K, N, grid(K, N, True), args.repeats, prologue)]
    print(f"\n{'shape':14s} {'xla us':>8s} {'best kernel of each layout':40s} {'us':>7s} {'TB/s':>5s}")
    for name in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == name and r.get("us")]
        xla = next((r for r in mine if r["variant"] == "xla padded"), None)
        for layout in ("kn", "nk"):
            best = min((r for r in mine if r["variant"].startswith(layout)), key=lambda r: r["us"], default=None)
            if best:
                print(f"{name:14s} {xla['us'] if xla else float('nan'):8.1f} {best['variant']:40s} "
                      f"{best['us']:7.1f} {best['tbps']:5.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, copy_tbps=ceiling, rows=rows),
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
