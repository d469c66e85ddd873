"""One decode step's attention as one Pallas kernel: the norm's row factor, RoPE of the new query and key, the write
of the new key and value into the cache (in place), and softmax(q·Kᵀ/√d)·V over each row's valid slots.

XLA runs that as 5 kernels a layer (RoPE with the row factor, two cache writes, scores with softmax, probs @ V;
bench/NOTES.md, "Decode stage after #18") and fuses no further. The kernel is flash-decoding: one program per
(row, KV head, split), each split a share of the row's valid slots [pad, slot), walked in blocks of `block` slots
with an online softmax over the group's query heads; a small combine merges the splits (none with one split, and
then the kernel writes the finished output itself). The new token never goes through the cache on its way into the
attention: split 0 starts its softmax from it, and no program reads the slot it is written to, so the write needs
no ordering against the reads.

Targets the Triton backend (`jax.experimental.pallas.triton`); off GPUs it runs in interpret mode. The math is the
model's (`lpjax/model.py`: `normed_project`, `apply_rope`, `_write_cache`, `_cached_attention` at one token a row),
which `decode_attention_reference` restates in plain jnp and the tests hold both to.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 64  # cache slots a program reads per step (a power of 2: Triton's tensors are)
TARGET_PROGRAMS = 128  # default splits: enough (row, KV head, split) programs for the GPU's ~132 SMs
MASKED = float(jnp.finfo(jnp.float32).min)  # the score of a masked slot, as in `_cached_attention`


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _i(n: int) -> jax.Array:
    """A static index as an int32 scalar: interpret mode's store takes no Python int next to a slice."""
    return jnp.int32(n)


def default_splits(batch: int, kv_heads: int, length: int, block: int = BLOCK) -> int:
    """Splits per (row, KV head): enough programs to fill the GPU, at most one per block of the cache."""
    return max(1, min(-(-length // block), TARGET_PROGRAMS // (batch * kv_heads)))


def _kernel(*refs, group: int, head_dim: int, length: int, batch: int, splits: int, block: int, finish: bool,
            scaled: bool, biased: bool, index_per_row: bool, pad_rows: bool):
    refs = list(refs)
    qkv_ref = refs.pop(0)
    scale_ref = refs.pop(0) if scaled else None
    bias_ref = refs.pop(0) if biased else None
    kc_ref, vc_ref, index_ref, pad_ref, freq_ref = refs[:5]
    outs = refs[5:-2]
    kc_out, vc_out = refs[-2:]
    h, f32 = head_dim // 2, jnp.float32
    b, s = pl.program_id(0), pl.program_id(2)
    dt, cdt = qkv_ref.dtype, kc_ref.dtype
    lo, hi = pl.ds(0, h), pl.ds(h, h)  # the two halves of a head: RoPE rotates one into the other

    def attend():
        index = index_ref[b] if index_per_row else index_ref[0]
        pad = pad_ref[b]
        slot = jnp.clip(index, 0, length - 1)  # where the new key goes (`dynamic_update_slice` clamps the same way)
        angles = (index - pad).astype(f32) * freq_ref[...]
        cos, sin = jnp.cos(angles).astype(dt), jnp.sin(angles).astype(dt)

        def row(j):
            """Row j of this KV head's group ([its query heads, key, value]) as halves, as the model has it
            before RoPE: the row factor applied in float32 and rounded, then the bias."""
            x1, x2 = qkv_ref[j, lo], qkv_ref[j, hi]
            if scaled:
                factor = scale_ref[b]
                x1, x2 = (x1.astype(f32) * factor).astype(dt), (x2.astype(f32) * factor).astype(dt)
            if biased:
                x1, x2 = x1 + bias_ref[j, lo], x2 + bias_ref[j, hi]
            return x1, x2

        def rope(x1, x2):  # `apply_rope`: halves * cos + (-x2, x1) * sin, in the activations' dtype
            return x1 * cos + (-x2) * sin, x2 * cos + x1 * sin

        k1, k2 = (x.astype(cdt) for x in rope(*row(group)))
        v1, v2 = (x.astype(cdt) for x in row(group + 1))

        def write():
            plgpu.store(kc_out.at[slot, lo], k1)
            plgpu.store(kc_out.at[slot, hi], k2)
            plgpu.store(vc_out.at[slot, lo], v1)
            plgpu.store(vc_out.at[slot, hi], v2)

        if splits == 1:
            write()
        else:
            pl.when(s == 0)(write)

        root = math.sqrt(head_dim)
        k1f, k2f, v1f, v2f = (x.astype(f32) for x in (k1, k2, v1, v2))
        queries, carry = [], []
        first = s == 0  # split 0 starts from the new token itself; the others from nothing
        for g in range(group):
            q1, q2 = (x.astype(f32) for x in rope(*row(g)))
            queries.append((q1, q2))
            score = (jnp.sum(q1 * k1f) + jnp.sum(q2 * k2f)) / root
            carry.append((jnp.where(first, score, MASKED), jnp.where(first, jnp.ones((), f32), jnp.zeros((), f32)),
                          jnp.where(first, v1f, 0.0), jnp.where(first, v2f, 0.0)))

        # this split's share of the slots [pad, slot), in whole blocks
        n = jnp.maximum(slot - pad, 0)
        chunk = pl.cdiv(pl.cdiv(n, splits), block) * block
        start = pad + s * chunk
        end = jnp.minimum(start + chunk, slot)
        steps = pl.cdiv(jnp.maximum(end - start, 0), block)

        def step(t, carry):
            first_slot = start + t * block
            at = jnp.minimum(first_slot, length - block)  # the last block is read ending at the cache's end
            rows = pl.ds(at, block)
            kb1, kb2 = kc_ref[rows, lo].astype(f32), kc_ref[rows, hi].astype(f32)
            vb1, vb2 = vc_ref[rows, lo].astype(f32), vc_ref[rows, hi].astype(f32)
            slots = at + jnp.arange(block)
            valid = (slots >= first_slot) & (slots < end)  # every block holds at least first_slot
            out = []
            for (top, den, o1, o2), (q1, q2) in zip(carry, queries):  # running max, denominator, numerator
                scores = (jnp.sum(kb1 * q1[None, :], axis=1) + jnp.sum(kb2 * q2[None, :], axis=1)) / root
                scores = jnp.where(valid, scores, MASKED)
                new_top = jnp.maximum(top, jnp.max(scores))
                correction = jnp.exp(top - new_top)
                p = jnp.where(valid, jnp.exp(scores - new_top), 0.0)
                out.append((new_top, den * correction + jnp.sum(p),
                            o1 * correction + jnp.sum(p[:, None] * vb1, axis=0),
                            o2 * correction + jnp.sum(p[:, None] * vb2, axis=0)))
            return tuple(out)

        carry = jax.lax.fori_loop(0, steps, step, tuple(carry))
        if finish:
            (out_ref,) = outs
            for g, (_, den, o1, o2) in enumerate(carry):
                plgpu.store(out_ref.at[_i(g), lo], (o1 / den).astype(out_ref.dtype))
                plgpu.store(out_ref.at[_i(g), hi], (o2 / den).astype(out_ref.dtype))
        else:
            o_ref, top_ref, den_ref = outs
            for g, (top, den, o1, o2) in enumerate(carry):
                plgpu.store(o_ref.at[_i(g), lo], o1)
                plgpu.store(o_ref.at[_i(g), hi], o2)
                top_ref[_i(g)] = top
                den_ref[_i(g)] = den

    if not pad_rows:
        attend()
        return
    pl.when(b < batch)(attend)

    @pl.when(b >= batch)
    def _():  # a padding row of the residual stream: zeros, as the model's pad gives it
        (out_ref,) = outs
        zeros = jnp.zeros((h,), out_ref.dtype)
        for g in range(group):
            plgpu.store(out_ref.at[_i(g), lo], zeros)
            plgpu.store(out_ref.at[_i(g), hi], zeros)


def _combine(o, top, den, dtype):
    """Merge the splits' partial softmaxes (numerators o [B, K, S, G, hd], running maxima `top` and denominators
    `den` [B, K, S, G]) into [B, K, G, hd]."""
    weight = jnp.exp(top - top.max(axis=2, keepdims=True))
    return ((o * weight[..., None]).sum(axis=2) / (den * weight).sum(axis=2)[..., None]).astype(dtype)


def decode_attention(qkv, row_scale, bias, k_cache, v_cache, index, pad, inv_freq, *, block: int = BLOCK,
                     splits: int | None = None, out_rows: int | None = None, interpret: bool | None = None,
                     num_warps: int = 4, num_stages: int = 2):
    """One new token per row: RoPE, cache write and attention (see the module docstring).

    qkv [R, K, G+2, hd]: the fused projection of R ≥ B rows (rows past B, a decode stream's padding, are not
    read), grouped per KV head as the model's `wqkv` is, before the norm's row factor `row_scale` [R] (float32;
    None: already applied) and the bias `bias` [K, G+2, hd] (or None). k_cache, v_cache [B, K, L, hd]: updated in
    place (aliased). index: the cache slot of each row's token ([] or [B] int32); pad [B]: each row's left padding
    (its RoPE position is index - pad, and slots before pad are never attended). inv_freq [hd/2]: RoPE's
    frequencies (`model.rope_inv_freq`). `splits` per (row, KV head), default `default_splits`; `out_rows` ≥ B:
    the output's rows, those past B zero. `interpret`: default, unless running on a GPU.

    Returns (out [out_rows, K·G, hd] in qkv's dtype, k_cache, v_cache).
    """
    B, K, L, hd = k_cache.shape
    R, G = qkv.shape[0], qkv.shape[2] - 2
    out_rows = B if out_rows is None else out_rows
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    block = min(block, 1 << (L.bit_length() - 1))  # at most the cache, and still a power of 2
    if not _power_of_two(block):
        raise ValueError(f"decode attention kernel: block {block} is not a power of 2")
    if hd % 2 or (not interpret and not _power_of_two(hd // 2)):
        raise ValueError(f"decode attention kernel: head_dim {hd} is not twice a power of 2 (Triton's tensors are)")
    if qkv.shape[1] != K or R < B or out_rows < B:
        raise ValueError(f"decode attention kernel: qkv {qkv.shape} does not match the cache {k_cache.shape}")
    splits = default_splits(B, K, L, block) if splits is None else splits
    finish = splits == 1
    index = jnp.asarray(index, jnp.int32)
    index_per_row = index.ndim == 1
    index = index if index_per_row else index.reshape(1)
    pad = jnp.asarray(pad, jnp.int32)
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    grid_rows = out_rows if finish else B

    def full(x):
        return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

    def cache_spec():
        return pl.BlockSpec((None, None, L, hd), lambda b, k, s: (jnp.minimum(b, B - 1), k, 0, 0))

    inputs = [qkv]
    in_specs = [pl.BlockSpec((None, None, G + 2, hd), lambda b, k, s: (jnp.minimum(b, R - 1), k, 0, 0))]
    if row_scale is not None:
        inputs.append(jnp.asarray(row_scale, jnp.float32))
        in_specs.append(full(inputs[-1]))
    if bias is not None:
        inputs.append(bias)
        in_specs.append(pl.BlockSpec((None, G + 2, hd), lambda b, k, s: (k, 0, 0)))
    first_cache = len(inputs)
    inputs += [k_cache, v_cache, index, pad, inv_freq]
    in_specs += [cache_spec(), cache_spec(), full(index), full(pad), full(inv_freq)]
    if finish:
        out_shape = [jax.ShapeDtypeStruct((out_rows, K, G, hd), qkv.dtype)]
        out_specs = [pl.BlockSpec((None, None, G, hd), lambda b, k, s: (b, k, 0, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((B, K, splits, G, hd), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, splits, G), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, splits, G), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, G, hd), lambda b, k, s: (b, k, s, 0, 0)),
                     pl.BlockSpec((None, None, None, G), lambda b, k, s: (b, k, s, 0)),
                     pl.BlockSpec((None, None, None, G), lambda b, k, s: (b, k, s, 0))]
    out_shape += [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape,
                                                                                            v_cache.dtype)]
    out_specs += [cache_spec(), cache_spec()]
    kernel = functools.partial(
        _kernel, group=G, head_dim=hd, length=L, batch=B, splits=splits, block=block, finish=finish,
        scaled=row_scale is not None, biased=bias is not None, index_per_row=index_per_row,
        pad_rows=grid_rows > B)
    results = pl.pallas_call(
        kernel,
        grid=(grid_rows, K, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={first_cache: len(out_shape) - 2, first_cache + 1: len(out_shape) - 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(*inputs)
    *outs, k_cache, v_cache = results
    if finish:
        out = outs[0]
    else:
        out = _combine(*outs, qkv.dtype)
        if out_rows > B:
            out = jnp.pad(out, ((0, out_rows - B), (0, 0), (0, 0), (0, 0)))
    return out.reshape(out_rows, K * G, hd), k_cache, v_cache


def decode_attention_reference(qkv, row_scale, bias, k_cache, v_cache, index, pad, inv_freq, *,
                               out_rows: int | None = None):
    """`decode_attention` in plain jnp, step by step as the model computes it (the arguments and the result are
    the kernel's)."""
    B, K, L, hd = k_cache.shape
    G, dt = qkv.shape[2] - 2, qkv.dtype
    x = qkv[:B]
    if row_scale is not None:  # `normed_project`: the row factor on the product, in float32, rounded
        x = (x * row_scale[:B, None, None, None]).astype(dt)
    if bias is not None:
        x = x + bias
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (B,))
    angles = (index - pad).astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)  # [B, hd/2]
    cos = jnp.cos(angles)[:, None, None, None, :].astype(dt)
    sin = jnp.sin(angles)[:, None, None, None, :].astype(dt)
    halves = x.reshape(B, K, G + 2, 2, hd // 2)
    rotated = jnp.flip(halves, axis=3) * jnp.array([[-1], [1]], dt)
    roped = (halves * cos + rotated * sin).reshape(B, K, G + 2, hd)
    q, k, v = roped[:, :, :G], roped[:, :, G], x[:, :, G + 1]

    def write(cache, new):  # each row at its own slot (clamped into the cache, as dynamic_update_slice does)
        return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n[:, None], i, axis=1))(
            cache, new.astype(cache.dtype), index)

    k_cache, v_cache = write(k_cache, k), write(v_cache, v)
    scores = jnp.einsum("bkgd,bkld->bkgl", q, k_cache, preferred_element_type=jnp.float32) / math.sqrt(hd)
    j = jnp.arange(L)
    valid = (j[None, :] <= index[:, None]) & (j[None, :] >= pad[:, None])  # [B, L]
    scores = jnp.where(valid[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgl,bkld->bkgd", probs, v_cache, preferred_element_type=jnp.float32).astype(dt)
    out = out.reshape(B, K * G, hd)
    if out_rows is not None and out_rows > B:
        out = jnp.pad(out, ((0, out_rows - B), (0, 0), (0, 0)))
    return out, k_cache, v_cache
