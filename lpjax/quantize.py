"""Weight-only quantization: int8 and int4 matrices with scales (and offsets), and the product that reads them
(docs/design.md section 7).

A `QuantizedWeight` stands in for a matrix w [K, *out] of the attention and MLP products (and an untied LM head),
K being its input, the axis a product contracts (always the first: lpjax/schema.py lays every matrix out so):

    w[k, o] ~ values[k, o] * scale[k // group, o] (+ offset[k // group, o])

- `values`: int8 or int4, w's shape. jnp.int4 is stored packed, two to a byte, and XLA reads it natively. Where the
  runtime does not pass int4 arrays to ahead-of-time compiled programs (jax 0.10's CPU runtime, which keeps int4
  one to a byte anyway: a layout mismatch), the model holds int4 values in int8 (`int4_storage`).
- `scale`, `offset`: [K / group, *out] in the compute dtype; one row per group of `group` consecutive inputs. int8 per
  output channel has one group ([1, *out]): its scale then multiplies the product's output columns, after the dot.
  `offset` (None when absent) is the per-group minimum of an affine scheme (int4 here; GGUF's Q4_1).
- Any leading stack axis (a stage's layers) leads every part alike; the group count is read from the shapes.

`QuantSpec` is what a user asks for (`--quantize`, `--group-size`) or what a checkpoint stores. Schemes:
int8 symmetric (|err| <= scale/2, scale = max|w| / 127), int4 affine as gpt-fast (scale = (max - min) / 15, offset
chosen so that the 16 levels span the group: |err| <= scale/2), and `gguf`: a GGUF file's own Q8_0 (int8, groups of
32), Q4_0 (int4, groups of 32) and Q4_1 (int4 with offsets) blocks, kept as they are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.errors import LPJaxError
from lpjax.kernels.quant_gemv import quant_gemv

KINDS = ("int8", "int4", "gguf")
DEFAULT_INT4_GROUP = 128
GGUF_BLOCK = 32  # inputs per block of GGUF's Q8_0, Q4_0 and Q4_1 types
_BITS = {"int8": 8, "int4": 4}
_VALUE_DTYPES = {"int8": jnp.int8, "int4": jnp.int4}
PRODUCT_KERNELS = ("xla", "pallas")  # what runs `product`'s decode-sized products of quantized weights
GEMV_ROWS = 8  # products of at most this many rows (decode's stream) are GEMVs: the Pallas kernel's


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How matrices are quantized: `kind` int8 | int4 | gguf (the GGUF file's own blocks), and the inputs per scale
    (`group_size`; None: one scale per output channel, int8's default)."""

    kind: str
    group_size: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LPJaxError(f"--quantize {self.kind}: choose one of {', '.join(KINDS)}")
        if self.group_size is not None and self.group_size < 1:
            raise LPJaxError(f"--group-size {self.group_size}: must be at least 1")

    @classmethod
    def parse(cls, kind: str | None, group_size: int | None = None) -> QuantSpec | None:
        """The spec of `--quantize KIND [--group-size G]` (None: no quantization), or one line saying what is wrong."""
        if kind is None:
            if group_size is not None:
                raise LPJaxError(f"--group-size {group_size}: only with --quantize int4 or int8")
            return None
        if kind == "gguf":
            if group_size is not None:
                raise LPJaxError(f"--group-size {group_size}: --quantize gguf keeps the file's own blocks of "
                                 f"{GGUF_BLOCK}")
            return cls("gguf", GGUF_BLOCK)
        if kind == "int4" and group_size is None:
            group_size = DEFAULT_INT4_GROUP
        return cls(kind, group_size)

    @classmethod
    def from_string(cls, text: str) -> QuantSpec:
        """Inverse of `str(spec)`: `int8`, `int8:64`, `int4:128`, `gguf` (what a converted checkpoint records)."""
        kind, _, group = text.partition(":")
        return cls.parse(kind, int(group) if group and kind != "gguf" else None)

    def __str__(self) -> str:
        if self.kind == "gguf" or self.group_size is None:
            return self.kind
        return f"{self.kind}:{self.group_size}"

    def describe(self) -> str:
        if self.kind == "gguf":
            return "the GGUF file's own quantized types (Q8_0 as int8, Q4_0/Q4_1 as int4, in groups of 32)"
        if self.group_size is None:
            return f"{self.kind} per output channel"
        return f"{self.kind} in groups of {self.group_size} inputs"

    def flags(self) -> str:
        """The command-line flags that ask for this spec."""
        if self.kind == "gguf":
            return "--quantize gguf"
        default = {"int8": None, "int4": DEFAULT_INT4_GROUP}[self.kind]
        return f"--quantize {self.kind}" + ("" if self.group_size == default else f" --group-size {self.group_size}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized matrix [K, *out] (see the module docstring). `values` is the first leaf, so a Flax parameter check
    of the matrix's shape sees the matrix's shape. The parts may be arrays, abstract shapes, shardings or lazy views."""

    values: Any
    scale: Any
    offset: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def parts(self) -> tuple:
        return (self.values, self.scale) if self.offset is None else (self.values, self.scale, self.offset)

    def replace(self, **kw) -> QuantizedWeight:
        return dataclasses.replace(self, **kw)

    def reshape(self, *shape) -> QuantizedWeight:
        """The same matrix with its output axes reshaped (the input axis, first, stays)."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        K = self.values.shape[0]
        if shape[0] not in (K, -1):
            raise ValueError(f"a quantized matrix keeps its input axis first: {self.shape} -> {shape}")
        out = tuple(shape[1:])
        return QuantizedWeight(*(None if p is None else p.reshape(p.shape[0], *out) for p in
                                 (self.values, self.scale, self.offset)))

    def scheme(self, input_axis: int = 0) -> tuple[str, int, bool]:
        """(values dtype, inputs per group, has offsets): what two matrices must share to be fused or stacked."""
        K, G = self.values.shape[input_axis], self.scale.shape[input_axis]
        return jnp.dtype(self.values.dtype).name, K // G, self.offset is not None


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


@functools.cache
def int4_storage(platform: str):
    """The dtype a model on `platform` holds int4 values in: int4 where an int4 array made by one compiled program
    can be handed to another compiled ahead of time (as the engine's programs are), else int8 (the values, and so
    every product, are the same). Asked once per platform, with a 2x2 array."""
    device = jax.local_devices(backend=platform)[0]
    try:
        x = jax.jit(lambda: jnp.zeros((2, 2), jnp.int4), out_shardings=jax.sharding.SingleDeviceSharding(device))()
        jax.block_until_ready(jax.jit(lambda a: a.astype(jnp.int32).sum()).lower(x).compile()(x))
    except ValueError:  # "Computation was compiled for input layouts that disagree with the layouts of arguments"
        return jnp.int8
    return jnp.int4


# ---------------------------------------------------------------------------------------------------- the math


def _round_up(x: jax.Array, dtype) -> jax.Array:
    """`x` (float32) in `dtype`, rounded up where rounding to nearest went down: a scale that still covers the range
    it was computed for, so that no value is clipped and the error bound holds in the stored dtype."""
    y = x.astype(dtype)
    return jnp.where(y.astype(jnp.float32) < x, jnp.nextafter(y, jnp.array(jnp.inf, dtype)), y)


def quantize(w: jax.Array, spec: QuantSpec, dtype=None) -> QuantizedWeight:
    """w [K, *out] (K: the input) quantized as `spec` says, scales (and offsets) in `dtype` (default: w's).
    int8: symmetric, values in [-127, 127], scale = max|w| / 127 per output channel or per group. int4: affine,
    values in [-8, 7], w ~ values * scale + offset with scale ~ (max - min) / 15 per group. Either way every element
    is within scale / 2 of its dequantized value."""
    if spec.kind not in _BITS:
        raise ValueError(f"quantize: {spec.kind} weights come quantized from their file")
    dtype = jnp.dtype(dtype or w.dtype)
    K, out = w.shape[0], w.shape[1:]
    group = spec.group_size or K
    if K % group:
        raise LPJaxError(f"--group-size {group}: does not divide the input width {K} of a weight matrix")
    g = w.astype(jnp.float32).reshape(K // group, group, -1)  # [groups, group, N]
    if spec.kind == "int8":
        scale = _round_up(jnp.max(jnp.abs(g), axis=1) / 127, dtype)  # [groups, N]
        scale = jnp.where(scale == 0, jnp.ones_like(scale), scale)
        q = jnp.clip(jnp.round(g / scale.astype(jnp.float32)[:, None]), -127, 127)
        offset = None
    else:
        lo, hi = jnp.min(g, axis=1), jnp.max(g, axis=1)
        offset = (lo + 8 * (hi - lo) / 15).astype(dtype)  # the value of level 0; levels -8..7 cover [lo, hi]
        off = offset.astype(jnp.float32)
        scale = _round_up(jnp.maximum((hi - off) / 7, (off - lo) / 8), dtype)
        scale = jnp.where(scale == 0, jnp.ones_like(scale), scale)
        q = jnp.clip(jnp.round((g - off[:, None]) / scale.astype(jnp.float32)[:, None]), -8, 7)
        offset = offset.reshape(K // group, *out)
    values = q.astype(_VALUE_DTYPES[spec.kind]).reshape(K, *out)
    return QuantizedWeight(values, scale.reshape(K // group, *out), offset)


def dequantize(qw: QuantizedWeight, dtype) -> jax.Array:
    """The matrix a quantized one stands for, computed in float32 and given in `dtype` (a reference; the model's
    products never form it outside their own program). Leading stack axes are kept: the input is the first axis
    where the values and the scales differ in length."""
    shape = qw.shape
    a = next((i for i, (v, s) in enumerate(zip(shape, qw.scale.shape)) if v != s), 0)
    G = qw.scale.shape[a]

    def grouped(x):  # [..., G, 1, ...] or [..., G, K/G, ...]
        return x.astype(jnp.float32).reshape(*shape[:a], G, x.shape[a] // G, *shape[a + 1:])

    w = grouped(qw.values) * grouped(qw.scale)
    if qw.offset is not None:
        w = w + grouped(qw.offset)
    return w.reshape(shape).astype(dtype)


def product(x: jax.Array, w, kernel: str = "xla") -> jax.Array:
    """x [..., K] @ w [K, *out] for a plain or a quantized w, in x's dtype.

    Quantized, the dequantization is an elementwise expression of the dot's operand, which XLA fuses into the GEMM
    (the weight crosses memory in its narrow type): int8 per output channel converts the operand and scales the
    product's output columns after the dot (exact: the scale is one number per column); grouped weights scale (and
    offset) the converted operand per group of rows. A plain weight is `x @ w`, as ever.

    `kernel="pallas"`: a quantized product of at most GEMV_ROWS rows (a decode step's) runs as the Pallas GEMV
    (`lpjax/kernels/quant_gemv.py`: the same math, accumulated in float32), which reads the narrow weights at
    bandwidth where XLA's GEMM does not; larger products (prefill) stay XLA's."""
    if kernel not in PRODUCT_KERNELS:
        raise ValueError(f"product kernel {kernel!r}: choose one of {', '.join(PRODUCT_KERNELS)}")
    if not isinstance(w, QuantizedWeight):
        return x @ w
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    G = w.scale.shape[0]
    if kernel == "pallas" and x2.shape[0] <= GEMV_ROWS:
        offset = None if w.offset is None else w.offset.reshape(G, -1)
        y = quant_gemv(x2, w.values.reshape(K, -1), w.scale.reshape(G, -1), offset)
        return y.reshape(*lead, *w.shape[1:])
    values = w.values.reshape(K, -1).astype(x.dtype)
    scale = w.scale.reshape(G, -1).astype(x.dtype)
    if G == 1 and w.offset is None:
        y = (x2 @ values) * scale[0]
    else:
        operand = values.reshape(G, K // G, -1) * scale[:, None]
        if w.offset is not None:
            operand = operand + w.offset.reshape(G, 1, -1).astype(x.dtype)
        y = x2 @ operand.reshape(K, -1)
    return y.reshape(*lead, *w.shape[1:])


# ---------------------------------------------------------------------------------------------------- placement


def part_spec(spec: P, values_shape: tuple[int, ...], part_shape: tuple[int, ...]) -> P:
    """Where a scale (or offset) sits, given where its matrix's values sit: like the values, except along an axis
    the part has only one entry of (per-channel scales along the input): that axis is replicated."""
    entries = tuple(spec) + (None,) * (len(values_shape) - len(spec))
    return P(*(e if p == v or p > 1 else None for e, v, p in zip(entries, values_shape, part_shape)))


def part_specs(spec: P, qw: QuantizedWeight) -> QuantizedWeight:
    """The PartitionSpecs of every part of `qw` (arrays or abstract shapes) when its values sit at `spec`."""
    return QuantizedWeight(*(None if p is None else part_spec(spec, qw.values.shape, p.shape)
                             for p in (qw.values, qw.scale, qw.offset)))


def part_sharding(sharding: NamedSharding, values_shape, part_shape) -> NamedSharding:
    return NamedSharding(sharding.mesh, part_spec(sharding.spec, tuple(values_shape), tuple(part_shape)))


def bits(dtype) -> int:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits
    return 8 * dtype.itemsize


def nbytes(tree) -> int:
    """Bytes of the arrays of a tree as the devices hold them (int4 packed two to a byte; numpy and JAX report one
    byte per int4 element)."""
    return sum(int(np.prod(x.shape)) * bits(x.dtype) // 8 for x in jax.tree.leaves(tree))
