"""Probe: a quantized GEMV with the weight held [N, K] (K contiguous: each thread reads 16 bytes along K and sums
them in place), against XLA's bf16 GEMM and lpjax's int8 product. Rows 1 and 8; int8 per channel, int4 g128 packed
as (low nibble: the group's first 64 inputs, high: its last 64).

Run from the repository root: `PYTHONPATH=. python bench/results/2026-12-01-h200-quant/gemv_nk_probe.py 1,8`
(output: gemv-nk.jsonl, stopped by its 420 s limit after wqkv; gemv-nk-first.txt is an earlier version's run, whose
multi-row forms did not lower). A lab probe, not part of lpjax: bench/NOTES.md row 58."""
import functools
import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bench.quant_gemv import timed
from lpjax.quantize import QuantSpec, product, quantize

f32 = jnp.float32
SHAPES = {"wqkv": (4096, 12288), "down": (11008, 4096)}


def to_f32(w, trick):
    if trick == "bits":  # u8 -> f32 as 2^23 + u, minus 2^23
        return jax.lax.bitcast_convert_type(w.astype(jnp.int32) | 0x4B000000, f32) - 8388608.0
    return w.astype(f32)


def tile_parts(x_ref, w_ref, s_ref, t, *, R, block_k, kind, trick, scale_now):
    """Σ over block t of x_r · w for each row r: R vectors [block_n] (int4: each group scaled)."""
    if kind in ("bf16", "int8"):
        ks = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
        w = to_f32(w_ref[:, ks], trick if kind == "int8" else "plain")
        if kind == "int8" and trick == "bits":
            w = w - 128.0
        parts = [jnp.sum(w * x_ref[r, ks].astype(f32)[None, :], axis=1) for r in range(R)]
        if scale_now and kind == "int8":
            sc = s_ref[:, 0].astype(f32)
            parts = [p * sc for p in parts]
        return parts
    parts = [None] * R
    for i in range(block_k // 128):
        g = t * (block_k // 128) + i
        b = w_ref[:, pl.ds(pl.multiple_of(g * 64, 64), 64)]
        lo, hi = to_f32(b & 0xF, trick), to_f32(b >> 4, trick)
        sc = s_ref[:, g].astype(f32)
        for r in range(R):
            x0 = x_ref[r, pl.ds(pl.multiple_of(g * 128, 128), 64)].astype(f32)
            x1 = x_ref[r, pl.ds(pl.multiple_of(g * 128 + 64, 64), 64)].astype(f32)
            p = (jnp.sum(lo * x0[None, :] + hi * x1[None, :], axis=1) - 8.0 * (jnp.sum(x0) + jnp.sum(x1))) * sc
            parts[r] = p if parts[r] is None else parts[r] + p
    return parts


def k_loop(x_ref, w_ref, s_ref, o_ref, *, R, block_k, steps, per_split, kind, trick, acc2d):
    s = pl.program_id(1)
    first, last = s * per_split, jnp.minimum((s + 1) * per_split, steps)
    if acc2d:  # R == 1, bf16/int8: elementwise accumulator, one reduction at the end
        def step(t, acc):
            ks = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
            w = to_f32(w_ref[:, ks], trick if kind == "int8" else "plain")
            if kind == "int8" and trick == "bits":
                w = w - 128.0
            return acc + w * x_ref[0, ks].astype(f32)[None, :]
        acc = jax.lax.fori_loop(first, last, step, jnp.zeros((w_ref.shape[0], block_k), f32))
        accs = (jnp.sum(acc, axis=1),)
    else:
        def step(t, accs):
            parts = tile_parts(x_ref, w_ref, s_ref, t, R=R, block_k=block_k, kind=kind, trick=trick, scale_now=False)
            return tuple(a + p for a, p in zip(accs, parts))
        accs = jax.lax.fori_loop(first, last, step, tuple(jnp.zeros((w_ref.shape[0],), f32) for _ in range(R)))
    for r in range(R):
        y = accs[r] * s_ref[:, 0].astype(f32) if kind == "int8" else accs[r]
        o_ref[r, :] = y.astype(o_ref.dtype)


def k_atomic(x_ref, w_ref, s_ref, z_ref, o_ref, *, R, block_k, kind, trick):
    parts = tile_parts(x_ref, w_ref, s_ref, pl.program_id(1), R=R, block_k=block_k, kind=kind, trick=trick,
                       scale_now=True)
    for r in range(R):
        plgpu.atomic_add(o_ref, (pl.ds(r, 1), pl.ds(0, o_ref.shape[1])), parts[r][None, :])


def call(x, w, sc, *, kind, mode, block_n, block_k, splits=1, warps=4, stages=3, trick="plain", acc2d=False):
    M, K = x.shape
    N = w.shape[0]
    steps = K // block_k
    specs = [pl.BlockSpec((M, K), lambda j, s: (0, 0)), pl.BlockSpec((block_n, w.shape[1]), lambda j, s: (j, 0)),
             pl.BlockSpec((block_n, sc.shape[1]), lambda j, s: (j, 0))]
    params = plgpu.CompilerParams(num_warps=warps, num_stages=stages)
    if mode == "atomic":
        out = pl.pallas_call(
            functools.partial(k_atomic, R=M, block_k=block_k, kind=kind, trick=trick), grid=(N // block_n, steps),
            in_specs=specs + [pl.BlockSpec((M, block_n), lambda j, s: (0, j))],
            out_specs=pl.BlockSpec((M, block_n), lambda j, s: (0, j)), out_shape=jax.ShapeDtypeStruct((M, N), f32),
            input_output_aliases={3: 0}, compiler_params=params)(x, w, sc, jnp.zeros((M, N), f32))
        return out.astype(x.dtype)
    per_split = -(-steps // splits)
    splits = -(-steps // per_split)
    finish = splits == 1
    if finish:
        out_shape, out_spec = jax.ShapeDtypeStruct((M, N), x.dtype), pl.BlockSpec((M, block_n), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, M, N), f32)
        out_spec = pl.BlockSpec((None, M, block_n), lambda j, s: (s, 0, j))
    out = pl.pallas_call(functools.partial(k_loop, R=M, block_k=block_k, steps=steps, per_split=per_split, kind=kind,
                                           trick=trick, acc2d=acc2d and M == 1),
                         grid=(N // block_n, splits), in_specs=specs, out_specs=out_spec, out_shape=out_shape,
                         compiler_params=params)(x, w, sc)
    return out if finish else out.sum(0).astype(x.dtype)


def make(name, K, N, key):
    k1, k2 = jax.random.split(key)
    if name == "bf16":
        return jax.random.normal(k1, (K, N), jnp.bfloat16) * 0.02
    if name == "bf16-nk":
        return (jax.random.normal(k1, (N, K), jnp.bfloat16) * 0.02, jnp.ones((N, 1), jnp.bfloat16))
    if name == "int8-xla":
        return quantize(jax.random.normal(k1, (K, N), f32) * 0.02, QuantSpec.parse("int8"))
    if name.startswith("int8"):
        trick = "bits" in name
        v = jax.random.randint(k1, (N, K), -127, 128, jnp.int32)
        vals = (v + 128).astype(jnp.uint8) if trick else v.astype(jnp.int8)
        return vals, (jax.random.uniform(k2, (1, N), f32) * 1e-3 + 1e-4).astype(jnp.bfloat16).reshape(N, 1)
    if name.startswith("int4"):
        v = jax.random.randint(k1, (N, K // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        return v, (jax.random.uniform(k2, (N, K // 128), f32) * 1e-3 + 1e-4).astype(jnp.bfloat16)


def fn(name, cfg):
    if name == "bf16":
        return lambda x, w: x @ w
    if name == "int8-xla":
        return lambda x, w: product(x, w)
    kind = name.split("-")[0]
    trick = "bits" if "bits" in name else "plain"
    return lambda x, w: call(x, w[0], w[1], kind=kind, trick=trick, **cfg)


def reference(name, x, w):
    if name == "bf16-nk":
        return x.astype(f32) @ w[0].astype(f32).T
    if name.startswith("int8"):
        vals, sc = w
        v = vals.astype(f32) - (128.0 if vals.dtype == jnp.uint8 else 0.0)
        return (x.astype(f32) @ v.T) * sc.astype(f32)[:, 0][None, :]
    vals, sc = w
    lo = (vals & 0xF).astype(f32) - 8
    hi = (vals >> 4).astype(f32) - 8
    N, Kh = vals.shape
    G = Kh // 64
    full = jnp.concatenate([lo.reshape(N, G, 64), hi.reshape(N, G, 64)], axis=2) * sc.astype(f32)[:, :, None]
    return x.astype(f32) @ full.reshape(N, -1).T


def main():
    rows_list = [int(r) for r in sys.argv[1].split(",")]

    def configs(name, K):
        if name in ("bf16", "int8-xla"):
            return [{}]
        rows = []
        for bk in (256, 512):
            if K % bk:
                continue
            for bn in (8, 16, 32):
                rows.append(dict(mode="atomic", block_n=bn, block_k=bk, warps=4 if bn * bk >= 8192 else 2))
            for bn, sp, w in ((16, 1, 4), (16, 4, 4), (32, 2, 4), (64, 8, 4)):
                rows.append(dict(mode="loop", block_n=bn, block_k=bk, splits=sp, warps=w))
            if not name.startswith("int4"):
                rows.append(dict(mode="loop", block_n=32, block_k=bk, splits=1, warps=4, acc2d=True))
        return rows

    out = []
    key = jax.random.PRNGKey(0)
    for shape, (K, N) in SHAPES.items():
        for rows in rows_list:
            x = (jax.random.normal(key, (rows, K), f32)).astype(jnp.bfloat16)
            for name in ["bf16", "bf16-nk", "int8-xla", "int8-plain", "int8-bits", "int4-plain", "int4-bits"]:
                ws = [make(name, K, N, jax.random.PRNGKey(i + 1)) for i in range(16)]
                cfgs = configs(name, K)
                for cfg in cfgs:
                    try:
                        f = fn(name, cfg)
                        if cfg:
                            got = jax.jit(f)(x, ws[0]).astype(f32)
                            want = reference(name, x, ws[0])
                            err = float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-9))
                        else:
                            err = 0.0
                        t, _ = timed(f, x, ws, 4, 5)
                        nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(ws[0]))
                        rec = dict(shape=shape, rows=rows, name=name, cfg=cfg, us=t * 1e6, tbs=nbytes / t / 1e12,
                                   err=err)
                    except Exception as e:  # noqa: BLE001
                        rec = dict(shape=shape, rows=rows, name=name, cfg=cfg, error=str(e).splitlines()[0][:200])
                    out.append(rec)
                    print(json.dumps(rec), flush=True)
    best = {}
    for r in out:
        if "us" in r and r["err"] < 2e-2:
            k = (r["shape"], r["rows"], r["name"])
            if k not in best or r["us"] < best[k]["us"]:
                best[k] = r
    print("BEST")
    for k, r in sorted(best.items()):
        print(f"{k[0]:5} rows={k[1]} {k[2]:11} {r['us']:7.1f} us {r['tbs']:5.2f} TB/s {r['cfg']}")


main()
