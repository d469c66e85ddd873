"""Micro-benchmark: how XLA compiles and times a decode-shaped [1, K] x [K, N] bf16 product, written several ways.

    python -m bench.gemv_variants

For each shape and variant: median time over repeats, achieved bandwidth, and whether the compiled HLO used a
GEMM (cuBLAS / Triton gemm fusion) or strength-reduced the dot to multiply + reduce.
"""

import statistics
import time

import jax
import jax.numpy as jnp

SHAPES = [(2048, 4096), (4096, 4096), (4096, 6144), (5504, 4096), (4096, 11008)]
VARIANTS = {
    "plain": lambda x, w: x @ w,
    "f32_accumulate": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
    "rows_padded_to_8": lambda x, w: (jnp.pad(x, ((0, 7), (0, 0))) @ w)[:1],
    "batched_3d": lambda x, w: jnp.einsum("btk,kn->btn", x[None], w)[0],
}


def kind(hlo: str) -> str:
    if "cublas" in hlo or "__cublas" in hlo:
        return "cublas"
    if "gemm_fusion" in hlo or "__triton_gemm" in hlo:
        return "triton-gemm"
    return "reduce"


def main():
    print(jax.devices()[0].device_kind, jax.__version__)
    for K, N in SHAPES:
        # 16 different weights per call (more than L2 holds), one dispatch for all of them
        ws = [jax.random.normal(jax.random.key(i), (K, N), jnp.bfloat16) for i in range(16)]
        x = jax.random.normal(jax.random.key(99), (1, K), jnp.bfloat16)
        for name, f in VARIANTS.items():
            fn = jax.jit(lambda x, ws, f=f: [f(x, w) for w in ws])
            hlo = fn.lower(x, ws).compile().as_text()
            jax.block_until_ready(fn(x, ws))
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, ws))
                times.append((time.perf_counter() - t0) / len(ws))
            t = statistics.median(times)
            print(f"K={K:5d} N={N:5d} {name:18s} {kind(hlo):12s} {t * 1e6:7.1f} us  {K * N * 2 / t / 1e12:5.2f} TB/s",
                  flush=True)


if __name__ == "__main__":
    main()
