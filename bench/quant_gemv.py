"""Micro-benchmark: decode-shaped products of quantized weights, as lpjax writes them and alternatives, on one device.

    python -m bench.quant_gemv [--rows 8] [--repeats 5] [--inner 10] [--only pallas] [--block-n N --block-k K
                               --splits S]

For each Llama-2-7B layer matrix ([K, N] on one GPU) and variant: the time per product, the bandwidth of the bytes it
must read (values + scales), what ran the dot (the Pallas GEMV, cuBLAS, a Triton GEMM fusion, or multiply + reduce)
and whether XLA wrote a bf16 copy of the weight before the dot (`copy`: a fusion whose output is a [K, N] bf16 array,
i.e. the dequantization was not fused into the GEMM).

Timing is device-side: one program, compiled ahead of time as the engine compiles its programs, runs `--inner`
rounds of products over 16 different weights (more than L2 holds), each round's input depending on the last round's
output (so XLA can neither hoist nor merge them; one tiny add a round), all on the device with no host round trip;
the time per product is that program's wall time over inner x 16, the median of `--repeats` calls. A host-timed
call of 16 products (as before) read small products low: their launch and sync cost was a large share.
`--block-n/--block-k/--splits` override the Pallas kernel's blocks (default `quant_gemv.default_blocks`).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp

from lpjax.kernels.quant_gemv import default_blocks, quant_gemv
from lpjax.quantize import QuantSpec, nbytes, product, quantize

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


BLOCKS: dict = {}  # the Pallas kernel's block overrides (`--block-n`, `--block-k`, `--splits`)


def pallas(x, q):
    """The Pallas GEMV (`lpjax/kernels/quant_gemv.py`): what `product(x, q, kernel="pallas")` runs for decode rows."""
    return quant_gemv(x, *q.parts, **BLOCKS)


VARIANTS = {  # name -> (quantization or None, product)
    "bf16": (None, lambda x, w: x @ w),
    "int8 (lpjax: scale after the dot)": (QuantSpec.parse("int8"), product),
    "int8 operand-scaled": (QuantSpec.parse("int8"), operand_scaled),
    "int8 (pallas gemv)": (QuantSpec.parse("int8"), pallas),
    "int8 g128 (lpjax)": (QuantSpec.parse("int8", 128), product),
    "int8 g128 (pallas gemv)": (QuantSpec.parse("int8", 128), pallas),
    "int4 g128 (lpjax, affine)": (QuantSpec.parse("int4"), product),
    "int4 g128 grouped dots": (QuantSpec.parse("int4"), grouped_dot),
    "int4 g128 (pallas gemv)": (QuantSpec.parse("int4"), pallas),
    "int4 g32 (lpjax, affine)": (QuantSpec.parse("int4", 32), product),
    "int4 g32 (pallas gemv)": (QuantSpec.parse("int4", 32), pallas),
}


def rounds(f, inner: int):
    """`inner` rounds of x @ each weight in one program; each round's x takes a tiny term of the last round's
    output, so no round can be hoisted out or merged with another. Returns the last round's outputs."""

    def run(x, ws):
        for _ in range(inner):
            ys = [f(x, w) for w in ws]
            x = x + (ys[-1][:, :1] * 1e-3).astype(x.dtype)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8, help="rows of the product (decode pads to 8)")
    p.add_argument("--repeats", type=int, default=5, help="calls of each program; the median is reported")
    p.add_argument("--inner", type=int, default=10, help="rounds of 16 products inside one program")
    p.add_argument("--only", default=None, help="only the variants whose name contains this")
    p.add_argument("--block-n", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--splits", type=int, default=None)
    p.add_argument("--hlo", default=None,
                   help="write each variant's optimized HLO of the first shape under this path prefix")
    args = p.parse_args(argv)
    BLOCKS.update({k: v for k, v in (("block_n", args.block_n), ("block_k", args.block_k),
                                     ("splits", args.splits)) if v is not None})
    variants = {k: v for k, v in VARIANTS.items() if args.only is None or args.only in k or k == "bf16"}
    print(jax.devices()[0].device_kind, jax.__version__, f"rows {args.rows}", f"device-timed: {args.inner} rounds "
          f"of 16 products a call, median of {args.repeats} calls", flush=True)
    for name, (K, N) in SHAPES.items():
        ws = [(jax.random.normal(jax.random.key(i), (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
              for i in range(16)]
        x = jax.random.normal(jax.random.key(99), (args.rows, K), jnp.bfloat16)
        for label, (spec, f) in variants.items():
            weights = ws if spec is None else [jax.jit(lambda w, spec=spec: quantize(w, spec))(w) for w in ws]
            compiled = rounds(f, args.inner).lower(x, weights).compile()  # ahead of time, as lpjax.compile does
            hlo = compiled.as_text()
            copies = len(re.findall(rf"= bf16\[{K},{N}\]\S* fusion\(", hlo)) // args.inner
            if args.hlo and name == "wqkv":
                with open(f"{args.hlo}-{re.sub(r'[^a-z0-9]+', '_', label)}.txt", "w") as out:
                    out.write(hlo)
            jax.block_until_ready(compiled(x, weights))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(x, weights))
                times.append((time.perf_counter() - t0) / (len(weights) * args.inner))
            t = statistics.median(times)
            read = nbytes(weights[0])
            blocks = ""
            if f is pallas:
                group = K if spec.group_size is None else spec.group_size
                blocks = " blocks n={} k={} splits={}".format(*(BLOCKS.get(k, d) for k, d in zip(
                    ("block_n", "block_k", "splits"), default_blocks(K, N, group, 8 if spec.kind == "int8" else 4))))
            print(f"{name:8s} K={K:5d} N={N:5d} {label:34s} {kind(hlo):12s} copy={copies:2d} {t * 1e6:8.1f} us "
                  f"{read / 1e6:7.1f} MB {read / t / 1e12:5.2f} TB/s{blocks}", flush=True)
        del ws
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
