"""Decode's residual add and RMSNorm as one Pallas (Triton) kernel.

A batch-1 decode step on H200 spends ~80% of its time in the weight GEMMs, which XLA already runs at ~3.9 TB/s
(bench/NOTES.md), and most of the rest in ~18 small kernels a layer of ~1.3 us each. Three of them come twice a
layer: the residual add, the norm's sum of squares, and its scale. This kernel does all three for one row per
program:

    h        = x + sum_p deltas[p]                      (the stream after a half-layer; deltas: a pair's two
                                                         halves on one device, or one all-reduced sum)
    normed_s = scales[s] * rms_normalise(h)             (each layer of the next half-stage has its own norm)

with the same roundings as `model.rms_norm` (normalise in float32, round to the stream's dtype, then scale). Each
program reads its row twice from L2 instead of keeping it (no barrier is needed between the passes).
`interpret=True` runs it on the CPU (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_CHUNK = 4096  # elements of a row a program holds at once


def _chunk(dim: int) -> int:
    c = 1
    while c < MAX_CHUNK and dim % (2 * c) == 0:
        c *= 2
    return c


def supported(dim: int) -> bool:
    """Rows the kernel tiles: the model width a multiple of 128."""
    return dim % 128 == 0


def _add_norm_kernel(x_ref, d_ref, s_ref, h_ref, n_ref, *, parts: int, layers: int, dim: int, chunk: int,
                     eps: float):
    r = pl.program_id(0)
    dtype = h_ref.dtype

    def stream(c0):
        at = pl.ds(c0, chunk)
        h = x_ref[r, at]
        if parts:
            d = d_ref[0, r, at].astype(jnp.float32)
            for p in range(1, parts):
                d = d + d_ref[p, r, at].astype(jnp.float32)
            h = (h.astype(jnp.float32) + d.astype(dtype).astype(jnp.float32)).astype(dtype)
        return h

    sumsq = jnp.float32(0)
    for c0 in range(0, dim, chunk):
        h = stream(c0)
        h_ref[r, pl.ds(c0, chunk)] = h
        sumsq += jnp.sum(jnp.square(h.astype(jnp.float32)))
    inv_rms = jax.lax.rsqrt(sumsq / dim + eps)
    out = n_ref.dtype
    for c0 in range(0, dim, chunk):
        normed = (stream(c0).astype(jnp.float32) * inv_rms).astype(dtype).astype(jnp.float32)
        for s in range(layers):
            n_ref[s, r, pl.ds(c0, chunk)] = (s_ref[s, pl.ds(c0, chunk)].astype(jnp.float32) * normed).astype(out)


def add_rms_norm(x: jax.Array, deltas: jax.Array | None, scales: jax.Array, eps: float,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x [R, D], deltas [P, R, D] or None, scales [S, D] -> (h [R, D], normed [S, R, D])."""
    R, D = x.shape
    S = scales.shape[0]
    parts = 0 if deltas is None else deltas.shape[0]
    if deltas is None:
        deltas = jnp.zeros((1, 1, D), x.dtype)  # never read
    kernel = functools.partial(_add_norm_kernel, parts=parts, layers=S, dim=D, chunk=_chunk(D), eps=eps)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((R, D), x.dtype),
                   jax.ShapeDtypeStruct((S, R, D), jnp.promote_types(x.dtype, scales.dtype))),
        grid=(R,),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(x, deltas, scales)
