"""Micro-benchmark: decode-shaped products of quantized weights, as lpjax writes them and alternatives, on one device.

    python -m bench.quant_gemv [--rows 8] [--repeats 5] [--inner 10] [--only int8,int4] [--shapes wqkv,down]
                               [--block-n N --block-k K --splits S | --sweep] [--json FILE]

For each Llama-2-7B layer matrix ([K, N] on one GPU) and variant: the time per product, the bandwidth of the bytes it
must read (values + scales), what ran the dot (the Pallas GEMV, cuBLAS, a Triton GEMM fusion, or multiply + reduce)
and whether XLA wrote a bf16 copy of the weight before the dot (`copy`: a fusion whose output is a [K, N] bf16 array,
i.e. the dequantization was not fused into the GEMM).

Timing is device-side: one program, compiled ahead of time as the engine compiles its programs, runs `--inner`
rounds of products over 16 different weights (more than L2 holds), each round's input depending on every product of
the last round (so XLA can neither drop, hoist nor merge them; one tiny add a round), all on the device with no host
round trip;
the time per product is that program's wall time over inner x 16, the median of `--repeats` calls. A host-timed
call of 16 products (as before) read small products low: their launch and sync cost was a large share.
`--block-n/--block-k/--splits` override the Pallas kernel's blocks (default `quant_gemv.default_blocks`); `--sweep`
times each Pallas variant at every SWEEP setting. The summary gives a layer's four products at each variant's best.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp

from lpjax.kernels.quant_gemv import default_blocks, largest_power_of_two_dividing, quant_gemv
from lpjax.quantize import QuantSpec, dequantize, nbytes, product, quantize

SHAPES = {"wqkv": (4096, 12288), "wo": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}


def grouped_dot(x, q):
    """Alternative for grouped weights: a dot per group, scaled and summed (no dequantized operand)."""
    K, G = q.values.shape[0], q.scale.shape[0]
    parts = jnp.einsum("rgk,gkn->rgn", x.reshape(-1, G, K // G), q.values.reshape(G, K // G, -1).astype(x.dtype),
                       preferred_element_type=jnp.float32)
    y = (parts * q.scale.astype(jnp.float32)).sum(axis=1)
    if q.offset is not None:
        y = y + x.reshape(-1, G, K // G).sum(-1).astype(jnp.float32) @ q.offset.astype(jnp.float32)
    return y.astype(x.dtype)


def operand_scaled(x, q):
    """Alternative for per-channel int8: the scale applied to the operand instead of the output."""
    return x @ (q.values.astype(x.dtype) * q.scale.astype(x.dtype))


def reduce_product(x, q):
    """Alternative: the product as multiply + reduce over K, the dequantized weight an elementwise input of the
    reduction (a column reduction of [rows, K, N]: XLA's reduction emitter instead of a GEMM)."""
    w = dequantize(q, jnp.float32)
    return (x.astype(jnp.float32)[:, :, None] * w[None]).sum(axis=1).astype(x.dtype)


BLOCKS: dict = {}  # the Pallas kernel's block overrides (`--block-n`, `--block-k`, `--splits`, or a --sweep entry)

# --sweep: Pallas configurations, (block_n, bytes of a column per block, splits (None: counted), warps, stages)
SWEEP = [(128, 256, None, 4, 3), (64, 256, None, 4, 3), (256, 256, None, 8, 3), (128, 128, None, 4, 4),
         (128, 512, None, 4, 3), (128, 256, None, 8, 4), (128, 256, 1, 4, 3), (64, 128, None, 4, 4)]


def pallas(x, q):
    """The Pallas GEMV (`lpjax/kernels/quant_gemv.py`): what `product(x, q, kernel="pallas")` runs for decode rows."""
    return quant_gemv(x, *q.parts, **BLOCKS)


def under_stage_vmap(x, q):
    """lpjax's product as a stage runs it: vmapped over the stage's stack axis (x shared, the weights stacked), the
    stack's products summed as an LP pair's residual adds them (one layer: a no-op)."""
    return jax.vmap(product, in_axes=(None, 0))(x, q).sum(0)


def stacked(n: int):
    """Weights held as a stage holds them: a leading stack axis of n (an LP pair: 2; its two matrices read)."""
    def hold(q):
        return jax.tree.map(lambda a: jnp.stack([a] * n), q)

    hold.matrices = n
    return hold


def held_in_int8(q):
    """int4 values one to a byte (as off GPUs): what the kernel's unpacking of packed int4 costs, by comparison."""
    return q.replace(values=q.values.astype(jnp.int8))


VARIANTS = {  # name -> (quantization or None, product[, what the weights are held as])
    "bf16": (None, lambda x, w: x @ w),
    "int8 reduce": (QuantSpec.parse("int8"), reduce_product),
    "int4 g128 reduce": (QuantSpec.parse("int4"), reduce_product),
    "int4 g128 held in int8 (pallas gemv)": (QuantSpec.parse("int4"), pallas, held_in_int8),
    "int8 (lpjax: scale after the dot)": (QuantSpec.parse("int8"), product),
    "int8 operand-scaled": (QuantSpec.parse("int8"), operand_scaled),
    "int8 (pallas gemv)": (QuantSpec.parse("int8"), pallas),
    "int8 g128 (lpjax)": (QuantSpec.parse("int8", 128), product),
    "int8 g128 (pallas gemv)": (QuantSpec.parse("int8", 128), pallas),
    "int4 g128 (lpjax, affine)": (QuantSpec.parse("int4"), product),
    "int4 g128 (lpjax, a stage of 1 layer)": (QuantSpec.parse("int4"), under_stage_vmap, stacked(1)),
    "int4 g128 (lpjax, an LP pair: 2 matrices)": (QuantSpec.parse("int4"), under_stage_vmap, stacked(2)),
    "int8 (lpjax, an LP pair: 2 matrices)": (QuantSpec.parse("int8"), under_stage_vmap, stacked(2)),
    "int4 g128 grouped dots": (QuantSpec.parse("int4"), grouped_dot),
    "int4 g128 (pallas gemv)": (QuantSpec.parse("int4"), pallas),
    "int4 g32 (lpjax, affine)": (QuantSpec.parse("int4", 32), product),
    "int4 g32 (pallas gemv)": (QuantSpec.parse("int4", 32), pallas),
}


def rounds(f, inner: int):
    """`inner` rounds of x @ each weight in one program; each round's x takes a tiny term of every product of the
    last round, so no product can be dropped, hoisted out or merged with another. (Taking the term from one product
    only let XLA drop the others of every round but the last: bf16 figures of 15 TB/s.) Returns the last round's
    outputs."""

    def run(x, ws):
        for _ in range(inner):
            ys = [f(x, w) for w in ws]
            x = x + (sum(y[:, :1].astype(jnp.float32) for y in ys) * 1e-3).astype(x.dtype)
        return ys

    return jax.jit(run)


def kind(hlo: str) -> str:
    if "__gpu$xla.gpu.triton" in hlo:  # a Pallas (Triton) kernel's custom call; XLA's own GEMMs are fusions
        return "pallas"
    if "cublas" in hlo:
        return "cublas"
    if "__triton_gemm" in hlo or "gemm_fusion" in hlo or "triton" in hlo:
        return "triton-gemm"
    return "reduce"


def timed(f, x, weights, inner: int, repeats: int) -> tuple[float, str]:
    """(seconds a product, the compiled HLO): `rounds` of `f`, compiled ahead of time as lpjax.compile does, the
    median of `repeats` calls over inner x len(weights) products."""
    compiled = rounds(f, inner).lower(x, weights).compile()
    jax.block_until_ready(compiled(x, weights))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x, weights))
        times.append((time.perf_counter() - t0) / (len(weights) * inner))
    return statistics.median(times), compiled.as_text()


def configurations(args, f, spec, K: int, N: int, hold=()) -> list[dict]:
    """The Pallas block settings to time for a variant: the one asked for (`--block-n` ...), or each --sweep entry
    (block_k from its bytes per column; a variant holding its weights otherwise takes the default); one empty setting
    for the other variants."""
    if f is not pallas:
        return [{}]
    if not args.sweep or hold:
        return [{k: v for k, v in (("block_n", args.block_n), ("block_k", args.block_k), ("splits", args.splits))
                 if v is not None}]
    bits = 8 if spec.kind == "int8" else 4
    group = spec.group_size or K
    out = []
    for block_n, column_bytes, splits, warps, stages in SWEEP:
        block_k = largest_power_of_two_dividing(K, column_bytes * 8 // bits)
        if group < K and group % block_k and block_k % group:
            continue
        out.append(dict(block_n=block_n, block_k=block_k, splits=splits, num_warps=warps, num_stages=stages))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8, help="rows of the product (decode pads to 8)")
    p.add_argument("--repeats", type=int, default=5, help="calls of each program; the median is reported")
    p.add_argument("--inner", type=int, default=10, help="rounds of 16 products inside one program")
    p.add_argument("--only", default=None,
                   help="only the variants whose name contains one of these comma-separated strings (and bf16)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated matrices of SHAPES")
    p.add_argument("--block-n", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--splits", type=int, default=None)
    p.add_argument("--sweep", action="store_true", help="time each Pallas variant at every SWEEP setting")
    p.add_argument("--json", default=None, help="write every row here")
    p.add_argument("--hlo", default=None,
                   help="write each variant's optimized HLO of the first shape under this path prefix")
    args = p.parse_args(argv)
    variants = {k: v for k, v in VARIANTS.items()
                if args.only is None or any(o in k for o in args.only.split(",")) or k == "bf16"}
    print(jax.devices()[0].device_kind, jax.__version__, f"rows {args.rows}", f"device-timed: {args.inner} rounds "
          f"of 16 products a call, median of {args.repeats} calls", flush=True)
    rows = []
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        ws = [(jax.random.normal(jax.random.key(i), (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
              for i in range(16)]
        x = jax.random.normal(jax.random.key(99), (args.rows, K), jnp.bfloat16)
        for label, (spec, f, *hold) in variants.items():
            weights = ws if spec is None else [jax.jit(lambda w, spec=spec: quantize(w, spec))(w) for w in ws]
            # the narrow weight's bytes (also for a variant that holds it wider), times the matrices of a stack
            read = nbytes(weights[0]) * getattr(hold[0] if hold else None, "matrices", 1)
            if hold:
                weights = [hold[0](w) for w in weights]
            for blocks in configurations(args, f, spec, K, N, hold):
                BLOCKS.clear()
                BLOCKS.update({k: v for k, v in blocks.items() if v is not None})
                try:
                    t, hlo = timed(f, x, weights, args.inner, args.repeats)
                except Exception as e:  # a setting Triton cannot compile: say so, go on
                    print(f"{name:8s} {label:34s} {blocks}: {str(e).splitlines()[0][:160]}", flush=True)
                    continue
                copies = len(re.findall(rf"= bf16\[(?:\d+,)?{K},{N}\]\S* fusion\(", hlo)) // args.inner
                if args.hlo and name == "wqkv":
                    with open(f"{args.hlo}-{re.sub(r'[^a-z0-9]+', '_', label)}.txt", "w") as out:
                        out.write(hlo)
                setting = ""
                if f is pallas:
                    bits = 8 if spec.kind == "int8" else 4
                    bn, bk, sp = default_blocks(K, N, spec.group_size or K, bits, blocks.get("block_n"),
                                                blocks.get("block_k"))
                    setting = (f" n={bn} k={bk} splits={blocks.get('splits') or sp} "
                               f"warps={blocks.get('num_warps', 4)} stages={blocks.get('num_stages', 3)}")
                rows.append(dict(shape=name, K=K, N=N, variant=label, kind=kind(hlo), copies=copies, us=t * 1e6,
                                 mb=read / 1e6, tb_s=read / t / 1e12, setting=setting.strip()))
                print(f"{name:8s} K={K:5d} N={N:5d} {label:34s} {kind(hlo):12s} copy={copies:2d} {t * 1e6:8.1f} us "
                      f"{read / 1e6:7.1f} MB {read / t / 1e12:5.2f} TB/s{setting}", flush=True)
        del ws
    best = {}
    for r in rows:
        key = (r["variant"], r["shape"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("a layer's four products at each variant's best setting (us):")
    for label in variants:
        per = [best[(label, n)] for n in args.shapes.split(",") if (label, n) in best]
        if per:
            print(f"  {label:34s} {sum(r['us'] for r in per):8.1f}  " +
                  "  ".join(f"{r['shape']} {r['us']:.1f} [{r['setting']}]" for r in per), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows_of_x=args.rows,
                           inner=args.inner, repeats=args.repeats, rows=rows), out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
