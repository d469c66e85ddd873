"""Pure-functional Flax (linen) Llama with Layer Parallelism.

Every layer runs as a *stage* whose weights carry a leading stack axis: 1 for a sequential layer, 2 for an LP pair
(docs/design.md section 1). A stage vmaps the same attention block and MLP block over that axis, each returning only its
*delta*, and sums the deltas:

    h   = x + sum_s A_s(n1_s(x))
    out = h + sum_s M_s(n2_s(h))

With a stack of 1 this is the ordinary pre-norm Llama layer, so one piece of code serves both.

The modules never see a mesh. `LlamaLM(per_device=True)` is built with per-device sizes and runs inside
`shard_map`: each block's output is a partial sum (its heads / MLP columns, its layer of the pair), and one `psum`
over all devices per half-stage finishes both the tensor-parallel sum and the pair sum. `per_device=False` builds
the whole model (for `init`, shape checks and single-device training) with no collectives.

What a call does is a `Mode` (static: each mode is its own compiled program); the cache is a dict of `StageCache`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lpjax.cache import StageCache
from lpjax.compile import PALLAS
from lpjax.config import ModelConfig
from lpjax.kernels.decode_attention import decode_attention
from lpjax.quantize import product
from lpjax.schema import BY_PATH, Sizes, TreeParam
from lpjax.sharding import ALL, Layout, StageLayout


@dataclasses.dataclass(frozen=True)
class Mode:
    """What one forward call does. With no cache: a causal pass over the call's tokens (training, eval). With a
    cache and `decode=False`: prefill (the same pass, also writing keys/values into the empty cache from slot 0).
    `decode=True`: append the call's tokens at `pos.index` and attend over the whole cache. `padded`: rows are
    left-padded, so a fresh pass masks the padding keys (decode always masks them)."""

    decode: bool = False
    padded: bool = False


FULL = Mode()
DECODE = Mode(decode=True)


@struct.dataclass
class Positions:
    """Where the tokens of one call sit.

    `positions` [B, T]: RoPE positions (left padding does not count). `pad` [B]: left-padding slots of each row;
    those keys are never attended. `index`: the cache slot of the call's first token: a scalar that all rows share
    (why batches are left-padded), or in a decode step [B], each row at its own slot (a server's decode slots, whose
    sequences started at different times).
    """

    positions: jax.Array
    pad: jax.Array
    index: jax.Array

    @classmethod
    def prompt(cls, pad: jax.Array, length: int) -> Positions:
        """A left-padded prompt of `length` slots written from cache slot 0."""
        positions = jnp.maximum(jnp.arange(length)[None, :] - pad[:, None], 0)
        return cls(positions, pad, jnp.int32(0))

    @classmethod
    def step(cls, pad: jax.Array, index: jax.Array) -> Positions:
        """One new token per row, written at cache slot `index` (scalar, or [B]: one slot per row)."""
        return cls((index - pad)[:, None], pad, index)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies, with HF's `llama3` and `linear` scaling."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = config.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs.kind == "linear":
        return (inv / rs.factor).astype(np.float32)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (HF layout, so q/k weights need no permutation). x: [B, T, heads, head_dim].

    The two halves are an axis of 2 and rotate-half is that axis reversed with a sign, (x1, x2) -> (-x2, x1): no
    concatenate, so XLA fuses the rotation into the kernel that reads it (the cache write, the attention scores)."""
    B, T, H, hd = x.shape
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2], the same for both halves
    cos = jnp.cos(angles)[:, :, None, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, None, :].astype(x.dtype)
    halves = x.reshape(B, T, H, 2, hd // 2)
    rotated = jnp.flip(halves, axis=3) * jnp.array([[-1], [1]], x.dtype)
    return (halves * cos + rotated * sin).reshape(B, T, H, hd)


def rms_scale(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm's one reduction: 1 / rms(x) per row, [..., 1] in float32."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF's RMSNorm: normalise in float32, cast back, then scale."""
    return weight * (x.astype(jnp.float32) * rms_scale(x, eps)).astype(x.dtype)


def _fresh_attention(q, k, v, pad, impl: str):
    """Causal attention of a call's tokens over themselves (prefill / full forward; the cache starts empty).

    Padding keys are masked for real queries; padding queries attend among themselves so no row is empty.
    """
    B, T = q.shape[:2]
    if impl == "cudnn" and pad is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    t = jnp.arange(T)
    mask = t[None, :] <= t[:, None]  # [Tq, Tk]
    if pad is not None:
        real_key = t[None, None, :] >= pad[:, None, None]  # [B, 1, Tk]
        pad_query = t[None, :, None] < pad[:, None, None]  # [B, Tq, 1]
        mask = mask[None] & (real_key | pad_query)
    else:
        mask = jnp.broadcast_to(mask, (B, T, T))
    mask = mask[:, None]
    if impl == "cudnn":  # cuDNN's batching rule (the stages' vmap) reads the mask as one per query head
        mask = jnp.broadcast_to(mask, (B, q.shape[2], T, T))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def _cached_attention(q, k_cache, v_cache, pos: Positions):
    """Attention of new queries over the whole static cache [B, K, L, hd]; keys past the query or in the left
    padding are masked. Head-major cache layout makes (batch, kv-head) the leading batch dims of both matmuls."""
    B, T, H, hd = q.shape
    K, L = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(B, T, K, H // K, hd)
    scores = jnp.einsum("btkgd,bkld->bkgtl", qg, k_cache, preferred_element_type=jnp.float32) / math.sqrt(hd)
    j = jnp.arange(L)
    if jnp.ndim(pos.index) == 0:
        i = (pos.index + jnp.arange(T))[None]  # [1, T]: every row's queries at the same slots
    else:
        i = pos.index[:, None] + jnp.arange(T)  # [B, T]: each row's at its own
    valid = (j[None, None, :] <= i[:, :, None]) & (j[None, None, :] >= pos.pad[:, None, None])  # [B, T, L]
    scores = jnp.where(valid[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgtl,bkld->btkgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, hd).astype(q.dtype)


def _write_cache(cache: StageCache, k: jax.Array, v: jax.Array, index) -> StageCache:
    """Write keys/values [B, T, K, hd] into the head-major cache [B, K, L, hd] at slots index..index+T-1 (`index`
    scalar: one slice for all rows; [B]: each row at its own slots, a scatter)."""
    def write(c, x):
        x = x.transpose(0, 2, 1, 3).astype(c.dtype)
        if jnp.ndim(index) == 0:
            return jax.lax.dynamic_update_slice_in_dim(c, x, index, axis=2)
        return jax.vmap(lambda row, xr, i: jax.lax.dynamic_update_slice_in_dim(row, xr, i, axis=1))(c, x, index)

    return StageCache(k=write(cache.k, k), v=write(cache.v, v))


MIN_MATMUL_ROWS = 8


def project(x: jax.Array, w, kernel: str = "xla") -> jax.Array:
    """x [..., K] @ w [K, ...]: the weight products of every layer (w plain or a `quantize.QuantizedWeight`, whose
    dequantization `quantize.product` writes into the product's operand).

    Decode multiplies one row per sequence. XLA:GPU rewrites a [1, K] x [K, N] product with a small weight
    ([2048, 4096], a 2-GPU shard of Llama-2-7B's output projection) into multiply + reduce kernels that ran at
    half the speed of a GEMM on H200 (bench/gemv_variants.py); with 8 rows it stays a GEMM, and reads the weight
    once all the same. So fewer than 8 rows are padded to 8 (a decode stream arrives with 8 already, `stream_rows`).
    `kernel`: what runs a quantized product of that size (`quantize.product`).
    """
    lead, K = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    w2 = w.reshape(K, -1)
    x2 = x.reshape(rows, K)
    if rows < MIN_MATMUL_ROWS:
        x2 = jnp.pad(x2, ((0, MIN_MATMUL_ROWS - rows), (0, 0)))
    return product(x2, w2, kernel)[:rows].reshape(*lead, *w.shape[1:])


def normed_project(x: jax.Array, norm: jax.Array, w: jax.Array, eps: float, kernel: str = "xla") -> jax.Array:
    """RMSNorm(x) @ w, with the norm's row factor applied to the product instead of its input.

    The factor is one number per row, so (s·x·n) W = s·((x·n) W): the product reads x·n, which XLA computes in the
    same kernel as the reduction Σx², and s lands in the kernel that reads the product (RoPE and the cache write;
    SwiGLU). One kernel between a residual add and its GEMM instead of a reduction, a normalise and a pad
    (bench/NOTES.md #18)."""
    y = project(x * norm, w, kernel)
    s = rms_scale(x, eps).reshape(*x.shape[:-1], *(1,) * (y.ndim - x.ndim + 1))
    return (y * s).astype(y.dtype)


def stream_rows(batch: int, tokens: int) -> int:
    """Rows of the residual stream for a decode call of `batch` rows of `tokens` each: fewer than MIN_MATMUL_ROWS
    tokens are padded once, at the embedding, with rows of token 0 up to that many, so that no product pads its
    input (4 pad kernels a layer before). Padding rows never reach the attention or the cache: it reads the real
    rows and writes zeros back for the rest."""
    return max(batch, -(-MIN_MATMUL_ROWS // tokens))


def _initializer(row: TreeParam, config: ModelConfig):
    """The flax initializer of the leaf's schema init."""
    init = row.init(config)
    return nn.initializers.normal(init.std) if init.std else nn.initializers.constant(init.fill)


def _param(module: nn.Module, path: str, stack: int | None = None) -> jax.Array:
    """The model-tree leaf `path`, shaped and initialised as its schema row says at the sizes `module` holds (its
    `config` and whichever `Sizes` fields it has). A stage leaf is one layer's (the vmap stacks it), or `stack`
    layers' when the stage declares it itself."""
    row = BY_PATH[path]
    sizes = Sizes(**{f.name: getattr(module, f.name, 0) for f in dataclasses.fields(Sizes)})
    shape = row.shape(module.config, sizes)
    if stack is not None:
        shape = (stack, *shape)
    return module.param(path.rpartition("/")[2], _initializer(row, module.config), shape, module.param_dtype)


class AttentionBlock(nn.Module):
    """One layer's attention half: norm, q/k/v, RoPE, cache write, attention, output projection (no residual,
    no output bias: the stage adds those once, after the all-reduce)."""

    config: ModelConfig
    heads: int
    kv_heads: int
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    quant_kernel: str = "xla"  # what runs decode-sized products of quantized weights (`quantize.product`)

    @nn.compact
    def __call__(self, x, cache: StageCache | None, pos: Positions, mode: Mode):
        c = self.config
        hd = c.head_dim
        rows, T = x.shape[:2]
        B = pos.positions.shape[0]  # real rows: a decode stream carries padding rows after them (`stream_rows`)
        G = self.heads // self.kv_heads  # query heads per KV head
        # One fused projection, grouped per KV head: [its G query heads, its key, its value]. Splitting the KV-head
        # axis over devices keeps every group whole, so q/k/v need no communication and one matmul reads them.
        norm, wqkv = _param(self, "attn/norm"), _param(self, "attn/wqkv")
        bias = _param(self, "attn/bqkv") if c.attention_bias else None
        inv_freq = rope_inv_freq(c)
        if mode.decode and T == 1 and self.attention_impl.startswith(PALLAS):
            # One kernel takes the product before the norm's row factor and does the rest up to `wo`: the factor,
            # the bias, RoPE, the cache write and the attention, with the stream's padding rows as zeros.
            qkv = project(x * norm, wqkv, self.quant_kernel)[:, 0]
            out, k_cache, v_cache = decode_attention(qkv, rms_scale(x, c.norm_eps)[:, 0, 0], bias, cache.k, cache.v,
                                                     pos.index, pos.pad, inv_freq, out_rows=rows)
            cache = StageCache(k=k_cache, v=v_cache)
            out = out.reshape(rows, T, self.heads * hd)
        else:
            qkv = normed_project(x, norm, wqkv, c.norm_eps, self.quant_kernel)[:B]
            if bias is not None:
                qkv = qkv + bias
            q = qkv[:, :, :, :G].reshape(B, T, self.heads, hd)
            k, v = qkv[:, :, :, G], qkv[:, :, :, G + 1]
            q, k = apply_rope(q, pos.positions, inv_freq), apply_rope(k, pos.positions, inv_freq)
            if mode.decode:
                cache = _write_cache(cache, k, v, pos.index)
                out = _cached_attention(q, cache.k, cache.v, pos)
            else:
                out = _fresh_attention(q, k, v, pos.pad if mode.padded else None,
                                       self.attention_impl.removeprefix(PALLAS))
                if cache is not None:  # prefill: the cache is empty, write this call's keys at slot 0
                    cache = _write_cache(cache, k, v, 0)
            out = out.reshape(B, T, self.heads * hd)
            if rows > B:
                out = jnp.pad(out, ((0, rows - B), (0, 0), (0, 0)))
        # A plain [B, T, H*hd] x [H*hd, D] matmul behind a barrier: otherwise XLA fuses the attention's probs @ V
        # into it as a multiply-and-reduce over an [H, hd, D] product (seen on 2 H200s: 23 us a layer, not 4).
        delta = project(jax.lax.optimization_barrier(out), _param(self, "attn/wo"), self.quant_kernel)
        return delta, cache


class MLPBlock(nn.Module):
    """One layer's SwiGLU half: norm, gate/up, down (no residual, no output bias)."""

    config: ModelConfig
    ffn: int
    param_dtype: jnp.dtype = jnp.float32
    quant_kernel: str = "xla"

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate_up = normed_project(x, _param(self, "mlp/norm"), _param(self, "mlp/w_gate_up"), c.norm_eps,
                                 self.quant_kernel)
        if c.mlp_bias:
            gate_up = gate_up + _param(self, "mlp/b_gate_up")
        return project(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], _param(self, "mlp/w_down"), self.quant_kernel)


def _stacked(block, size: int):
    """`block` vmapped over the stage's stack axis: weights and cache stacked, input shared, deltas stacked."""
    return nn.vmap(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None if block is MLPBlock else (None, 0, None, None),
        out_axes=0,
        axis_size=size,
    )


class StageBlock(nn.Module):
    """The computation of one `plan.Stage`: a sequential layer (stack 1) or an LP pair (stack 2)."""

    config: ModelConfig
    stack: int  # layers in the stage (1 or 2); output biases are replicated, so they keep this size
    local_stack: int  # layers of the stage held here (1 on each half of a "pair" mesh axis of 2)
    heads: int
    kv_heads: int
    ffn: int
    per_device: bool = False  # inside shard_map: finish the partial sums with one psum over every device
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    quant_kernel: str = "xla"

    def _reduce(self, deltas):
        total = deltas.sum(axis=0)  # the pair sum (a no-op for a stack of one)
        return jax.lax.psum(total, ALL) if self.per_device else total

    @nn.compact
    def __call__(self, x, cache: StageCache | None, pos: Positions, mode: Mode):
        c = self.config
        attn = _stacked(AttentionBlock, self.local_stack)(c, self.heads, self.kv_heads, self.param_dtype,
                                                         self.attention_impl, self.quant_kernel, name="attn")
        deltas, cache = attn(x, cache, pos, mode)
        a = self._reduce(deltas)
        if c.attention_bias:
            a = a + _param(self, "attn_out_bias", self.stack).sum(0)
        h = x + a.astype(x.dtype)
        m = self._reduce(_stacked(MLPBlock, self.local_stack)(c, self.ffn, self.param_dtype, self.quant_kernel,
                                                         name="mlp")(h))
        if c.mlp_bias:
            m = m + _param(self, "mlp_out_bias", self.stack).sum(0)
        return h + m.astype(h.dtype), cache


def stage_block(layout: Layout, s: StageLayout, per_device: bool = False, param_dtype=jnp.float32,
                attention_impl: str = "xla", name: str | None = None, quant_kernel: str = "xla") -> StageBlock:
    """The block that computes stage `s` of `layout`, at the sizes held on one device (`per_device`, inside
    `shard_map`) or the whole stage's: the model's own stages, and the plan-as-data forward's (lpjax/quality/
    plan_data.py), which applies one on its own."""
    c, d = layout.config, (s.split if per_device else 1)
    layers = s.stack // layout.pair_size if per_device and s.stage.is_pair else s.stack
    return StageBlock(c, s.stack, layers, c.n_heads // d, s.kv_heads // d, c.ffn_dim // d, per_device, param_dtype,
                      attention_impl, quant_kernel, name=name)


class Embed(nn.Module):
    """Token embedding, split over the vocabulary when `per_device`: each device looks up the ids it owns and
    one psum assembles the rows. `attend` is the tied LM head."""

    config: ModelConfig
    vocab: int
    per_device: bool = False
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = _param(self, "embed/embedding")

    def __call__(self, tokens):
        if not self.per_device:
            return jnp.take(self.embedding, tokens, axis=0)
        local = tokens - jax.lax.axis_index(ALL) * self.vocab
        owned = (local >= 0) & (local < self.vocab)
        rows = jnp.take(self.embedding, jnp.clip(local, 0, self.vocab - 1), axis=0)
        return jax.lax.psum(jnp.where(owned[..., None], rows, 0).astype(rows.dtype), ALL)

    def attend(self, x):
        return x @ self.embedding.T


class Norm(nn.Module):
    config: ModelConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return rms_norm(x, _param(self, "norm/scale"), self.config.norm_eps)


class LlamaLM(nn.Module):
    """Llama decoder with an LP plan baked into its stages (`layout`).

    `per_device=True`: per-device sizes and live collectives (run inside `shard_map` over the layout's mesh).
    `mode` says what the call does (see `Mode`); `logits_index`, when given, picks one position's logits (prefill
    needs only the last). Returns float32 logits over the real vocabulary and the new cache (None without one).

    `span=(a, b)` runs stages a..b-1 only, so that a step can be a chain of programs (`runtime.host_step`): a span
    that does not start at 0 takes the residual stream the span before it returned instead of token ids, and one
    that stops short of the last stage returns that stream (and its stages' cache) instead of logits.
    """

    layout: Layout
    per_device: bool = False
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    span: tuple[int, int] | None = None
    quant_kernel: str = "xla"  # "pallas": decode-sized products of quantized weights as the Pallas GEMV

    @property
    def config(self) -> ModelConfig:
        return self.layout.config

    @property
    def vocab(self) -> int:
        """Padded vocabulary held here (the embedding's rows, the LM head's columns)."""
        return self.layout.vocab_padded // (self.layout.n_devices if self.per_device else 1)

    @nn.compact
    def __call__(self, inputs, pos: Positions, cache: dict[str, StageCache] | None = None, mode: Mode = FULL,
                 logits_index=None):
        c, lay = self.layout.config, self.layout
        n = lay.n_devices if self.per_device else 1
        start, stop = self.span or (0, len(lay.stages))
        embed = Embed(c, self.vocab, self.per_device, self.param_dtype, name="embed")
        B, T = pos.positions.shape
        if start == 0:
            tokens = inputs
            if mode.decode:
                tokens = jnp.pad(tokens, ((0, stream_rows(B, T) - B), (0, 0)))
            x = embed(tokens)
        else:
            x = inputs
        new_cache = {}
        for s in lay.stages[start:stop]:
            stage = stage_block(lay, s, self.per_device, self.param_dtype, self.attention_impl, name=s.name,
                                quant_kernel=self.quant_kernel)
            x, new_cache[s.name] = stage(x, None if cache is None else cache[s.name], pos, mode)
        if stop < len(lay.stages):
            return x, (new_cache if cache is not None else None)
        x = Norm(c, self.param_dtype, name="norm")(x[:B])
        if logits_index is not None:
            x = jax.lax.dynamic_index_in_dim(x, logits_index, axis=1, keepdims=False)  # [B, D]
        if c.tied_embeddings:
            logits = embed.attend(x)
        else:
            logits = product(x, _param(self, "lm_head"), self.quant_kernel)
        logits = logits.astype(jnp.float32)
        if self.per_device and n > 1:
            logits = jax.lax.all_gather(logits, ALL, axis=logits.ndim - 1, tiled=True)
        return logits[..., : c.vocab_size], (new_cache if cache is not None else None)
