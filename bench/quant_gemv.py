"""Micro-benchmark: decode-shaped products of quantized weights, as lpjax writes them and alternatives, on one device.

    python -m bench.quant_gemv [--rows 8] [--repeats 30]

For each Llama-2-7B layer matrix ([K, N] on one GPU) and variant: the median time per product over 16 different
weights per call (more than L2 holds), the bandwidth of the bytes it must read (values + scales), what XLA made of
the dot (cuBLAS, a Triton GEMM fusion, or multiply + reduce) and whether it wrote a bf16 copy of the weight before the
dot (`copy`: a fusion whose output is a [K, N] bf16 array, i.e. the dequantization was not fused into the GEMM). Every
program is compiled ahead of time and called as the engine calls its programs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp

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


VARIANTS = {  # name -> (quantization or None, product)
    "bf16": (None, lambda x, w: x @ w),
    "int8 (lpjax: scale after the dot)": (QuantSpec.parse("int8"), product),
    "int8 operand-scaled": (QuantSpec.parse("int8"), operand_scaled),
    "int8 g128 (lpjax)": (QuantSpec.parse("int8", 128), product),
    "int4 g128 (lpjax, affine)": (QuantSpec.parse("int4"), product),
    "int4 g128 grouped dots": (QuantSpec.parse("int4"), grouped_dot),
    "int4 g32 (lpjax, affine)": (QuantSpec.parse("int4", 32), product),
}


def kind(hlo: str) -> str:
    if "cublas" in hlo:
        return "cublas"
    if "__triton_gemm" in hlo or "gemm_fusion" in hlo or "triton" in hlo:
        return "triton-gemm"
    return "reduce"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8, help="rows of the product (decode pads to 8)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--hlo", default=None,
                   help="write each variant's optimized HLO of the first shape under this path prefix")
    args = p.parse_args(argv)
    print(jax.devices()[0].device_kind, jax.__version__, f"rows {args.rows}", flush=True)
    for name, (K, N) in SHAPES.items():
        ws = [(jax.random.normal(jax.random.key(i), (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
              for i in range(16)]
        x = jax.random.normal(jax.random.key(99), (args.rows, K), jnp.bfloat16)
        for label, (spec, f) in VARIANTS.items():
            weights = ws if spec is None else [jax.jit(lambda w, spec=spec: quantize(w, spec))(w) for w in ws]
            fn = jax.jit(lambda x, ws, f=f: [f(x, w) for w in ws])
            compiled = fn.lower(x, weights).compile()  # ahead of time, as lpjax.compile does
            hlo = compiled.as_text()
            copies = len(re.findall(rf"= bf16\[{K},{N}\]\S* fusion\(", hlo))
            if args.hlo and name == "wqkv":
                with open(f"{args.hlo}-{re.sub(r'[^a-z0-9]+', '_', label)}.txt", "w") as out:
                    out.write(hlo)
            jax.block_until_ready(compiled(x, weights))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(x, weights))
                times.append((time.perf_counter() - t0) / len(weights))
            t = statistics.median(times)
            read = nbytes(weights[0])
            print(f"{name:8s} K={K:5d} N={N:5d} {label:34s} {kind(hlo):12s} copy={copies:2d} {t * 1e6:8.1f} us "
                  f"{read / 1e6:7.1f} MB {read / t / 1e12:5.2f} TB/s", flush=True)
        del ws
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
