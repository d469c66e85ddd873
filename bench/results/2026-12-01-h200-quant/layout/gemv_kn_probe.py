"""Probe: a 1-row quantized GEMV over lpjax's own [K, N] layout (N contiguous) with a 2-D float32 accumulator
[block_k, block_n] (each weight dequantized with its group's scale row and offset, times x[k] as a column), summed
over k once at the end. The [N, K] probe of 2026-12-01 reached int8 24.8 us / int4 29.8 us on wqkv this way; the
FMA form that lost (79 us) used a 3-D accumulator [rows, block_k, block_n]."""

import functools
import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bench.quant_gemv import timed
from lpjax.kernels.quant_gemv import quant_gemv
from lpjax.quantize import QuantSpec, dequantize, product, quantize

f32 = jnp.float32
SHAPES = {"wqkv": (4096, 12288), "down": (11008, 4096)}


def kernel(x_ref, w_ref, s_ref, *refs, K, block_k, group, per_split, affine):
    o_ref = refs[-1]
    off_ref = refs[0] if affine else None
    s = pl.program_id(1)
    steps = K // block_k
    first, last = s * per_split, jnp.minimum((s + 1) * per_split, steps)
    per_channel = group == K and not affine

    def step(t, acc):
        ks = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
        w = w_ref[ks, :].astype(f32)  # [block_k, block_n]
        if not per_channel:
            g = pl.ds(t * block_k // group, 1)
            w = w * s_ref[g, :].astype(f32)
            if affine:
                w = w + off_ref[g, :].astype(f32)
        return acc + w * x_ref[0, ks].astype(f32)[:, None]

    acc = jax.lax.fori_loop(first, last, step, jnp.zeros((block_k, w_ref.shape[1]), f32))
    y = jnp.sum(acc, axis=0)
    if per_channel:
        y = y * s_ref[0, :].astype(f32)
    o_ref[...] = y[None, :].astype(o_ref.dtype)


def gemv(x, values, scale, offset=None, *, block_n=128, block_k=32, splits=1, warps=4, stages=3):
    M, K = x.shape
    N, G = values.shape[1], scale.shape[0]
    group = K // G
    steps = K // block_k
    per_split = -(-steps // splits)
    splits = -(-steps // per_split)
    cols = lambda b: pl.BlockSpec((b, block_n), lambda j, s: (0, j))  # noqa: E731
    ins = [x, values, scale] + ([] if offset is None else [offset])
    specs = [pl.BlockSpec((1, K), lambda j, s: (0, 0)), cols(K), cols(G)] + ([] if offset is None else [cols(G)])
    finish = splits == 1
    out_shape = jax.ShapeDtypeStruct((1, N) if finish else (splits, 1, N), x.dtype if finish else f32)
    out_spec = (
        pl.BlockSpec((1, block_n), lambda j, s: (0, j))
        if finish
        else pl.BlockSpec((None, 1, block_n), lambda j, s: (s, 0, j))
    )
    out = pl.pallas_call(
        functools.partial(kernel, K=K, block_k=block_k, group=group, per_split=per_split, affine=offset is not None),
        grid=(N // block_n, splits),
        in_specs=specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    )(*ins)
    return out if finish else out.sum(0).astype(x.dtype)


def main():
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else None
    cfgs = [
        dict(block_n=bn, block_k=bk, splits=sp, warps=w)
        for bn, bk, sp, w in [
            (128, 32, 1, 4),
            (128, 32, 4, 4),
            (256, 32, 2, 4),
            (64, 64, 2, 4),
            (128, 64, 4, 8),
            (256, 16, 4, 4),
            (128, 16, 8, 4),
            (64, 32, 8, 2),
            (512, 16, 2, 8),
            (128, 128, 4, 8),
        ]
    ]
    key = jax.random.PRNGKey(0)
    best = {}
    for shape, (K, N) in SHAPES.items():
        x = jax.random.normal(key, (1, K), f32).astype(jnp.bfloat16)
        for name, spec in [("int8", QuantSpec.parse("int8")), ("int4 g128", QuantSpec.parse("int4"))]:
            if only and name not in only:
                continue
            ws = [
                quantize(jax.random.normal(jax.random.PRNGKey(i + 1), (K, N), f32) * 0.02, spec, jnp.bfloat16)
                for i in range(16)
            ]
            variants = [("bf16 xla", None), (f"{name} xla (8 padded rows)", None), (f"{name} pallas dot", None)]
            variants += [(f"{name} kn-acc2d", c) for c in cfgs]
            for label, cfg in variants:
                if label == "bf16 xla":
                    wb = [jax.random.normal(jax.random.PRNGKey(i + 1), (K, N), jnp.bfloat16) for i in range(16)]
                    f, weights = (lambda x, w: x @ w), wb
                elif "xla" in label:
                    f, weights = (lambda x, q: product(jnp.pad(x, ((0, 7), (0, 0))), q)[:1]), ws
                elif "dot" in label:
                    f, weights = (lambda x, q: quant_gemv(x, *q.parts)), ws
                else:
                    if (K // cfg["block_k"]) * cfg["block_k"] != K or (spec.group_size or K) % cfg["block_k"]:
                        continue
                    f, weights = (lambda x, q, c=cfg: gemv(x, *q.parts, **c)), ws
                try:
                    got = jax.jit(f)(x, weights[0]).astype(f32)
                    if label != "bf16 xla":
                        want = x.astype(f32) @ dequantize(weights[0], f32)
                        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                    else:
                        err = 0.0
                    t, _ = timed(f, x, weights, 4, 5)
                    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(weights[0]))
                    if "int4" in label:
                        nbytes -= weights[0].values.size // 2  # packed on GPUs: itemsize reads 1
                    rec = dict(
                        shape=shape,
                        label=label,
                        cfg=cfg,
                        us=round(t * 1e6, 2),
                        tbs=round(nbytes / t / 1e12, 2),
                        err=err,
                    )
                    k = (shape, label.split(" kn")[0] + (" kn" if cfg else ""))
                    if err < 2e-2 and (k not in best or rec["us"] < best[k]["us"]):
                        best[k] = rec
                except Exception as e:  # noqa: BLE001
                    rec = dict(shape=shape, label=label, cfg=cfg, error=str(e).splitlines()[0][:200])
                print(json.dumps(rec), flush=True)
    print("BEST")
    for k, r in sorted(best.items()):
        print(f"{k[0]:5} {r['label']:30} {r['us']:7.1f} us {r['tbs']:5.2f} TB/s {r['cfg']}")


main()
