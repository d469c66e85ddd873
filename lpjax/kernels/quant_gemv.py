"""Decode products of quantized weights as one Pallas kernel: x [M ≤ 16, K] @ W [K, N] with W int8 or int4
(`lpjax.quantize.QuantizedWeight`), reading the narrow values once and dequantizing them in registers.

XLA fuses the dequantization into its Triton GEMM, but the GEMM it picks for 8 rows reads int8 per channel barely
faster than bf16 and grouped int8/int4 two to three times slower (bench/quant_gemv.py). A decode product is a GEMV:
every weight byte is read once and used by at most 8 rows, so its time is the bytes over the bandwidth.

The kernel: program (j, s) owns columns [j·block_n, (j+1)·block_n) and split s of K's blocks of `block_k`. It walks
its blocks with x's rows (masked up to the 16 a Triton dot takes; never padded in memory), loads each [block_k,
block_n] tile in its narrow type (int4 as packed bytes, unpacked in registers), converts it to x's dtype and
multiplies on the tensor cores with float32 accumulation. Per output channel (one scale row, no offset) the scale
multiplies the sum once at the end; grouped weights scale each group's partial product, and an affine offset adds
(Σ of the group's x) · offset. With one split the kernel writes the finished [M, N] in x's dtype; with more, each
writes a float32 partial and one small sum finishes (splits fill the GPU's SMs when N has few column blocks).

Measured on an H200 (bench/quant_gemv.py, 8 rows), every form of these products is bound by work per weight, not by
bytes: int8 per channel takes about a bf16 GEMM's time for half the bytes (wqkv: 30.5 us against 32.7), int4 in
groups of 128 twice that, whether XLA's or this kernel's; building the bf16 values from their bits instead of
converting them did not help, and neither did elementwise FMAs without the tensor cores (3x slower), weights held
[N, K] (int8 at most ~2 TB/s at 1 row), a 2-D accumulator over [K, N], or the weight as the dot's first operand
(bench/NOTES.md, 2026-12-01).

Targets the Triton backend (`jax.experimental.pallas.triton`); off GPUs it runs in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 16  # rows a program computes: a Triton dot takes at least 16; rows past x's are masked
BLOCK_N = 128
BLOCK_K_BYTES = 256  # default block_k: this many bytes of a column per step (256 int8 inputs, 512 int4)
TARGET_PROGRAMS = 264  # default splits: enough programs for two waves of an H200's 132 SMs


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def largest_power_of_two_dividing(n: int, at_most: int) -> int:
    """The largest power of 2 that divides `n` and is at most `at_most` (1 at least)."""
    p = 1
    while p * 2 <= at_most and n % (p * 2) == 0:
        p *= 2
    return p


def _counted_splits(blocks: int, steps: int) -> int:
    """The fewest powers of 2 of splits (at most one a step) that give `blocks` column blocks TARGET_PROGRAMS
    programs."""
    splits = 1
    while blocks * splits < TARGET_PROGRAMS and splits * 2 <= steps:
        splits *= 2
    return splits


def default_blocks(K: int, N: int, group: int, bits: int, block_n: int | None = None,
                   block_k: int | None = None) -> tuple[int, int, int]:
    """(block_n, block_k, splits) for a [K, N] weight of `bits` per value in groups of `group` inputs: block_n
    128 (less for a narrow N), block_k the largest power of 2 dividing K up to BLOCK_K_BYTES of a column (and at
    least 16, the dot's least), splits the fewest powers of 2 that give TARGET_PROGRAMS programs. A block size
    given is kept, and the splits are counted for it."""
    block_n = block_n or min(BLOCK_N, max(16, 1 << (N - 1).bit_length()))
    if block_k is None:
        block_k = largest_power_of_two_dividing(K, BLOCK_K_BYTES * 8 // bits)
        if group < K and group % block_k and block_k % group:  # a block must hold whole groups or lie inside one
            block_k = largest_power_of_two_dividing(group, block_k)
    return block_n, block_k, _counted_splits(-(-N // block_n), K // block_k)


def _tile(rows: int, N: int, block_n: int):
    """Program (j, ·)'s view of its columns: (row_ok [MAX_ROWS, 1]: rows of x that exist,
    column_load(ref, row slice): those rows of the ref's [.., block_n] columns of the program, masked where N is
    ragged, store(o_ref, acc): the existing part of the result)."""
    j = pl.program_id(0)
    row_ok = (jnp.arange(MAX_ROWS) < rows)[:, None]
    col_ok = (j * block_n + jnp.arange(block_n) < N)[None, :]
    ragged = N % block_n != 0

    def column_load(ref, rows_slice):
        if ragged:
            return plgpu.load(ref.at[rows_slice, :], mask=col_ok, other=0)
        return ref[rows_slice, :]

    def store(o_ref, acc):
        plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=row_ok & col_ok if ragged else row_ok)

    return row_ok, column_load, store


def _kernel(x_ref, w_ref, s_ref, *refs, rows: int, K: int, N: int, block_n: int, block_k: int, group: int,
            per_split: int, affine: bool, interpret: bool):
    off_ref = refs[0] if affine else None
    o_ref = refs[-1]
    s = pl.program_id(1)
    f32, dt = jnp.float32, x_ref.dtype
    row_ok, column_load, store = _tile(rows, N, block_n)
    per_channel = group == K and not affine
    sub = min(group, block_k)  # inputs a partial product covers: one group, or the whole block inside one

    def step(t, acc):
        for i in range(block_k // sub):
            k0 = t * block_k + i * sub
            ks = pl.ds(pl.multiple_of(k0, sub), sub)
            xs = plgpu.load(x_ref.at[:, ks], mask=row_ok, other=0)  # [16, sub] in x's dtype
            w = column_load(w_ref, ks).astype(dt)  # [sub, block_n]: int8 / int4 -> x's dtype, exact
            if dt == f32 or interpret:  # interpret: CPUs have no bf16 x bf16 -> f32 dot; exact in f32 all the same
                part = plgpu.dot(xs.astype(f32), w.astype(f32), allow_tf32=False)
            else:
                part = plgpu.dot(xs, w)  # float32
            if per_channel:
                acc = acc + part
                continue
            g = pl.ds(k0 // group, 1)
            acc = acc + part * column_load(s_ref, g).astype(f32)
            if affine:
                acc = acc + jnp.sum(xs.astype(f32), axis=1, keepdims=True) * column_load(off_ref, g).astype(f32)
        return acc

    first = s * per_split
    last = jnp.minimum(first + per_split, K // block_k)
    acc = jax.lax.fori_loop(first, last, step, jnp.zeros((MAX_ROWS, block_n), f32))
    if per_channel:
        acc = acc * column_load(s_ref, pl.ds(0, 1)).astype(f32)
    store(o_ref, acc)


def _call(kernel, name: str, x, values, scale, offset, *, block_n: int, steps: int, splits: int,
          interpret: bool, num_warps: int, num_stages: int):
    """Run `kernel` (given its `per_split`) over the grid (column blocks, splits of `steps`), reading x in blocks of
    MAX_ROWS rows and the weight's parts in their program's columns. With one split it writes the finished [M, N] in x's
    dtype; with more, float32 partials [splits, M, N] that one sum finishes."""
    (M, K), (N, G) = x.shape, (values.shape[1], scale.shape[0])
    per_split = -(-steps // min(splits, steps))
    splits = -(-steps // per_split)  # no split without steps
    finish = splits == 1

    def columns(b):
        return pl.BlockSpec((b, block_n), lambda j, s: (0, j))

    inputs = [x, values, scale] + ([] if offset is None else [offset])
    in_specs = [pl.BlockSpec((MAX_ROWS, K), lambda j, s: (0, 0)), columns(K), columns(G)]
    in_specs += [] if offset is None else [columns(G)]
    if finish:
        out_shape = jax.ShapeDtypeStruct((M, N), x.dtype)
        out_spec = pl.BlockSpec((MAX_ROWS, block_n), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, M, N), jnp.float32)
        out_spec = pl.BlockSpec((None, MAX_ROWS, block_n), lambda j, s: (s, 0, j))
    out = pl.pallas_call(
        functools.partial(kernel, per_split=per_split),
        grid=(-(-N // block_n), splits),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)
    return out if finish else out.sum(axis=0).astype(x.dtype)


def quant_gemv(x, values, scale, offset=None, *, block_n: int | None = None, block_k: int | None = None,
               splits: int | None = None, interpret: bool | None = None, num_warps: int = 4,
               num_stages: int = 3):
    """x [M, K] @ W [K, N], W ~ values * scale[k // group] (+ offset[k // group]) (see the module docstring).

    values [K, N] int8, or int4 (jnp.int4, or int4 values held in int8: the arithmetic is the same); scale and
    offset [G, N] with G dividing K (G = 1 without offset: per output channel, scaled after the sum). M ≤ 16.
    Blocks default to `default_blocks`; `interpret` defaults to True unless running on a GPU. Returns [M, N] in x's
    dtype, accumulated in float32."""
    M, K = x.shape
    N = values.shape[1]
    G = scale.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"quantized GEMV kernel: {M} rows, at most {MAX_ROWS}")
    if values.shape[0] != K or K % G or scale.shape != (G, N) or (offset is not None and offset.shape != (G, N)):
        raise ValueError(f"quantized GEMV kernel: x {x.shape}, values {values.shape}, scale {scale.shape} "
                         f"and offset {None if offset is None else offset.shape} do not fit")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    launch = dict(interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    group = K // G
    bits = 4 if jnp.dtype(values.dtype) == jnp.int4 or offset is not None else 8  # int4 may be held in int8
    block_n, block_k, default_splits = default_blocks(K, N, group, bits, block_n, block_k)
    if not (_power_of_two(block_n) and _power_of_two(block_k)) or block_n < 16 or block_k < 16 or K % block_k:
        raise ValueError(f"quantized GEMV kernel: blocks {block_k} x {block_n} must be powers of 2 of at least 16, "
                         f"block_k dividing K = {K}")
    if group < K and group % block_k and block_k % group:
        raise ValueError(f"quantized GEMV kernel: block_k {block_k} neither holds whole groups of {group} nor lies "
                         f"inside one")
    kernel = functools.partial(_kernel, rows=M, K=K, N=N, block_n=block_n, block_k=block_k, group=group,
                               affine=offset is not None, interpret=interpret)
    return _call(kernel, "quant_gemv", x, values, scale, offset, block_n=block_n, steps=K // block_k,
                 splits=splits or default_splits, **launch)
