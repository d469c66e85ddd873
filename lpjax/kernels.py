"""Decode GEMV: one row times a weight matrix, as a Pallas (Triton) kernel with its input transform fused in.

At batch 1 a decode step is ~4 weight products a layer, each reading a matrix once for one row: memory-bound, and
XLA:GPU runs them as padded GEMMs at ~3.1 TB/s of the H200's ~4.3 (bench/NOTES.md), with the RMSNorm and the
SwiGLU product as separate small kernels in between. This kernel reads the weight [K, N] in its stored layout:

- the grid is (column blocks of BN, K splits of K/S): enough programs to fill every SM even when N is small, each
  streaming [BK, BN] tiles of its K range (contiguous rows of BN columns, software-pipelined by Triton);
- the row is transformed as it is read, so no kernel writes the transformed row: `rmsnorm` normalises it (the
  row's sum of squares is re-read from L2 by every program, ~K*2 bytes) and scales by the norm weight, exactly as
  `model.rms_norm`; `swiglu` takes the [2, F] gate/up product and multiplies silu(gate) by up;
- each program writes float32 partial sums [S, N]; the caller's `sum(0)` fuses into whatever reads the result.

`interpret=True` runs the same kernel on the CPU (tests). Block sizes come from `blocks`, tuned on H200 with
`bench/gemv_kernels.py`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

PROLOGUES = (None, "rmsnorm", "swiglu")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile of one program (BK rows x BN columns per step), K splits, and Triton's warps and pipeline depth."""

    bn: int = 128
    bk: int = 64
    splits: int = 1
    warps: int = 4
    stages: int = 3


TARGET_PROGRAMS = 1024  # ~8 programs an SM on H200's 132: enough loads in flight to keep HBM busy


def _largest_pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d < cap and n % (2 * d) == 0:
        d *= 2
    return d


def blocks(K: int, N: int, bn: int = 128, bk: int = 64, target: int = TARGET_PROGRAMS, warps: int = 4,
           stages: int = 3, min_steps: int = 2) -> Blocks:
    """Block sizes for a [K, N] weight: the largest power-of-two tiles (up to bn, bk) that divide N and K, then the
    fewest K splits (dividing K's tile count, each split at least `min_steps` tiles) that reach `target` programs."""
    bn = _largest_pow2_divisor(N, bn)
    bk = _largest_pow2_divisor(K, bk)
    tiles = K // bk
    options = [d for d in range(1, tiles + 1) if tiles % d == 0 and tiles // d >= min_steps] or [1]
    splits = next((d for d in options if (N // bn) * d >= target), options[-1])
    return Blocks(bn, bk, splits, warps, stages)


def blocks_nk(K: int, N: int, bn: int = 8, bk: int = 512, warps: int = 4, stages: int = 3) -> Blocks:
    """Block sizes for an [N, K] (transposed) weight: bn whole rows a program, bk-long steps along them."""
    return Blocks(_largest_pow2_divisor(N, bn), _largest_pow2_divisor(K, bk), 1, warps, stages)


SUMSQ_CHUNK = 2048  # elements of the row read at once for its sum of squares


def supported(K: int, N: int) -> bool:
    """Shapes the kernel tiles without masking: both dimensions divisible by 16."""
    return K % 16 == 0 and N % 16 == 0


def _kernel(x_ref, scale_ref, w_ref, o_ref, *, prologue, eps, K, b: Blocks):
    n, s = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(n * b.bn, b.bn), b.bn)
    span = K // b.splits
    steps = span // b.bk

    row = _row_reader(x_ref, scale_ref, prologue, eps, K, b.bk)

    def step(i, acc):
        k0 = pl.multiple_of(s * span + i * b.bk, b.bk)
        w = w_ref[pl.ds(k0, b.bk), cols].astype(jnp.float32)
        return acc + row(k0)[:, None] * w

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((b.bk, b.bn), jnp.float32))
    o_ref[s, cols] = acc.sum(axis=0)


def _kernel_nk(x_ref, scale_ref, w_ref, o_ref, *, prologue, eps, K, b: Blocks):
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * b.bn, b.bn), b.bn)
    row = _row_reader(x_ref, scale_ref, prologue, eps, K, b.bk)

    def step(i, acc):
        k0 = pl.multiple_of(i * b.bk, b.bk)
        return acc + w_ref[rows, pl.ds(k0, b.bk)].astype(jnp.float32) * row(k0)[None, :]

    acc = jax.lax.fori_loop(0, K // b.bk, step, jnp.zeros((b.bn, b.bk), jnp.float32))
    o_ref[rows] = acc.sum(axis=1).astype(o_ref.dtype)


def _row_reader(x_ref, scale_ref, prologue, eps, K, bk):
    """`row(k0)`: the transformed input row's elements k0..k0+bk, in float32."""
    inv_rms = None
    if prologue == "rmsnorm":
        chunk = _largest_pow2_divisor(K, SUMSQ_CHUNK)

        def square(i, acc):
            xi = x_ref[pl.ds(pl.multiple_of(i * chunk, chunk), chunk)].astype(jnp.float32)
            return acc + xi * xi

        sumsq = jax.lax.fori_loop(0, K // chunk, square, jnp.zeros((chunk,), jnp.float32)).sum()
        inv_rms = jax.lax.rsqrt(sumsq / K + eps)

    def row(k0):
        at = pl.ds(k0, bk)
        if prologue == "rmsnorm":
            normed = (x_ref[at].astype(jnp.float32) * inv_rms).astype(x_ref.dtype)  # as model.rms_norm rounds it
            out = jnp.promote_types(x_ref.dtype, scale_ref.dtype)
            return (scale_ref[at].astype(jnp.float32) * normed.astype(jnp.float32)).astype(out).astype(jnp.float32)
        if prologue == "swiglu":
            gate = x_ref[at].astype(jnp.float32)
            up = x_ref[pl.ds(k0 + K, bk)]
            act = (gate * jax.nn.sigmoid(gate)).astype(up.dtype)
            return (act * up).astype(jnp.float32)
        return x_ref[at].astype(jnp.float32)

    return row


def gemv(x: jax.Array, w: jax.Array, *, prologue: str | None = None, scale: jax.Array | None = None,
         eps: float = 1e-6, config: Blocks | None = None, interpret: bool = False) -> jax.Array:
    """prologue(x) @ w for one row. x: [K] ([2K] for `swiglu`: gate then up), w: [K, N], scale: [K] (`rmsnorm`).
    Returns [N] in w's dtype, summed over the kernel's K splits in float32."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue {prologue!r}: one of {PROLOGUES}")
    K, N = w.shape
    b = config or blocks(K, N)
    if N % b.bn or K % (b.splits * b.bk):
        raise ValueError(f"blocks {b} do not tile a [{K}, {N}] weight")
    if scale is None:
        scale = jnp.ones((K,), w.dtype)
    kernel = functools.partial(_kernel, prologue=prologue, eps=eps, K=K, b=b)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b.splits, N), jnp.float32),
        grid=(N // b.bn, b.splits),
        compiler_params=plgpu.CompilerParams(num_warps=b.warps, num_stages=b.stages),
        interpret=interpret,
        name=f"gemv_{prologue or 'plain'}",
    )(x, scale, w)
    return partial.sum(axis=0).astype(w.dtype)


def gemv_nk(x: jax.Array, w: jax.Array, *, prologue: str | None = None, scale: jax.Array | None = None,
            eps: float = 1e-6, config: Blocks | None = None, interpret: bool = False) -> jax.Array:
    """prologue(x) @ w.T for one row, w stored [N, K] (each output a dot product of one contiguous weight row)."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue {prologue!r}: one of {PROLOGUES}")
    N, K = w.shape
    b = config or blocks_nk(K, N)
    if N % b.bn or K % b.bk:
        raise ValueError(f"blocks {b} do not tile an [{N}, {K}] weight")
    if scale is None:
        scale = jnp.ones((K,), w.dtype)
    kernel = functools.partial(_kernel_nk, prologue=prologue, eps=eps, K=K, b=b)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((N,), w.dtype),
        grid=(N // b.bn,),
        compiler_params=plgpu.CompilerParams(num_warps=b.warps, num_stages=b.stages),
        interpret=interpret,
        name=f"gemv_nk_{prologue or 'plain'}",
    )(x, scale, w)
