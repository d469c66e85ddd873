"""Weight-only int8 and int4 products of a rank's shard, written the way gpt-fast quantizes.

- int8: per output channel, symmetric: an int8 weight [out, in] and one scale per row in the compute dtype. The
  product is gpt-fast's `WeightOnlyInt8Linear`: `F.linear(x, w.to(x.dtype)) * scales`. Compiled, inductor fuses
  the convert into the decode GEMV (with its coordinate-descent tuning on, which turns a one-row product into a
  fused reduction); eager, the convert runs as its own kernel.
- int4: asymmetric, in groups of G inputs along each row, a scale and a zero a group (tinygemm's convention: the
  value is (q - 8) * scale + zero for q in 0..15). The product is torch's int4pack kernel,
  `torch.ops.aten._weight_int4pack_mm` on CUDA (weights packed by `_convert_weight_to_int4pack` from [out, in / 2]
  uint8, bf16 activations and scales) and `_weight_int4pack_mm_for_cpu` on CPU (packed by
  `_convert_weight_to_int4pack_for_cpu` from the int32 values; activations in the compute dtype), so the CPU tests
  run the same math. The kernels take G of 32, 64, 128 or 256, inputs a multiple of G and outputs a multiple of
  16 (the CPU packing's; CUDA's tile is 8: one rule on both, so what the CPU tests accept runs on a GPU).

Quantized: each layer's fused `wqkv`, `wo`, fused `w_gate_up` and `w_down`, and under int8 the LM head (as gpt-fast
does); under int4 the LM head stays in the compute dtype. Embedding, norms, biases and the KV cache are never
quantized. Each rank quantizes its own shard after its weights are read or drawn, layer by layer: a row-parallel
product (`wo`, `w_down`) gets its int8 scales over the rank's slice of the row and its int4 groups inside the slice
(so G must divide the slice's width).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from lpjax.errors import LPJaxError

Tensor = torch.Tensor

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4pack kernels take
INT4_OUT_MULTIPLE = 16  # outputs: the CPU packing's multiple (CUDA's tile is 8), one rule on both devices
PRODUCTS = ("wqkv", "wo", "w_gate_up", "w_down")  # the layer products that are quantized


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a rank stores its products' weights."""

    mode: str  # "int8" or "int4"
    group_size: int = 128  # int4: inputs per group

    def __post_init__(self):
        if self.mode not in ("int8", "int4"):
            raise LPJaxError(f"--quantize {self.mode}: choose int8 or int4")
        if self.mode == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise LPJaxError(f"--group-size {self.group_size}: torch's int4 kernel takes groups of "
                             f"{', '.join(map(str, INT4_GROUP_SIZES))}")

    @property
    def lm_head(self) -> bool:
        """Whether the LM head is quantized too: under int8, as gpt-fast does; int4 keeps it in the compute dtype."""
        return self.mode == "int8"

    def record(self) -> dict:
        """The fields records carry."""
        return {"quantize": self.mode, "group_size": self.group_size if self.mode == "int4" else None}

    def describe(self) -> str:
        return f"int4, groups of {self.group_size}" if self.mode == "int4" else "int8 per output channel"


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    weight: Tensor  # int8 [out, in]
    scales: Tensor  # [out], compute dtype


@dataclasses.dataclass(frozen=True)
class Int4Weight:
    packed: Tensor  # the int4pack kernel's layout of the [out, in] values
    scales_and_zeros: Tensor  # [in / group, out, 2]: the kernel's dtype (bf16 on CUDA)
    group_size: int
    out_features: int


Weight = Tensor | Int8Weight | Int4Weight


# ---------------------------------------------------------------------------------------------- the schemes


def quantize_int8(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """gpt-fast's per-channel int8: scale = max |w| of the row / 127.5 (in `dtype`, at least float32's eps),
    q = round(w / scale) clipped to int8. |w - q * scale| <= scale / 2."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps).to(dtype)
    q = (w / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    """float32 [out, in]."""
    return q.float() * scales.float()[:, None]


def quantize_int4(w: Tensor, group_size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """gpt-fast's grouped int4: per group of `group_size` inputs, scale = (max - min) / 15 and zero = min + 8 * scale
    (both in `dtype`), q = round((w - (zero - 8 * scale)) / scale) clipped to 0..15. Returns int32 q [out, in] and
    scales, zeros [out, in / group]; |w - dequantized| <= scale / 2 (up to the rounding of scale and zero)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(dtype)
    zeros = (lo + 8 * scales.float()).to(dtype)
    low = (zeros.float() - 8 * scales.float())[..., None]
    q = ((groups - low) / scales.float()[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scales, zeros


def dequantize_int4(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """float32 [out, in]."""
    n, k = q.shape
    groups = (q.float() - 8).reshape(n, k // group_size, group_size)
    return (groups * scales.float()[..., None] + zeros.float()[..., None]).reshape(n, k)


def int4_problem(n: int, k: int, group_size: int) -> str | None:
    """Why torch's int4 kernel cannot hold a [n, k] weight in groups of `group_size`, or None."""
    if k % group_size:
        return f"the group of {group_size} does not divide its {k} inputs"
    if n % INT4_OUT_MULTIPLE:
        return f"its {n} outputs are not a multiple of {INT4_OUT_MULTIPLE} (the int4 kernels' tiles)"
    return None


def _inner_k_tiles(k: int) -> int:
    """The widest packing (8, 4 or 2 tiles of 16 inputs) that divides k; G >= 32 dividing k leaves 2 at least."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def pack_int4(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Int4Weight:
    """The int4pack kernel's operands on q's device: CUDA packs two values a byte (even input in the high nibble)
    into its tiled layout and takes bf16 scales; CPU packs the int32 values and takes the compute dtype."""
    n, k = q.shape
    tiles = _inner_k_tiles(k)
    if q.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), tiles)
        kernel_dtype = scales.dtype
    else:
        pairs = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        kernel_dtype = torch.bfloat16
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(kernel_dtype)
    return Int4Weight(packed, scales_and_zeros, group_size, n)


def quantize_weight(w: Tensor, q: Quantization, name: str = "weight") -> Weight:
    """A dense [out, in] weight as `q` stores it, its scales in the weight's dtype."""
    if q.mode == "int8":
        return Int8Weight(*quantize_int8(w, w.dtype))
    problem = int4_problem(*w.shape, q.group_size)
    if problem:
        raise LPJaxError(f"--quantize int4: {name} [{w.shape[0]}, {w.shape[1]}]: {problem}")
    return pack_int4(*quantize_int4(w, q.group_size, w.dtype), q.group_size)


# ---------------------------------------------------------------------------------------------- the product


def linear(x: Tensor, w: Weight, bias: Tensor | None = None) -> Tensor:
    """x @ w.T + bias for a dense or quantized weight, in x's dtype."""
    if isinstance(w, Int8Weight):
        y = F.linear(x, w.weight.to(x.dtype)) * w.scales
        return y if bias is None else y + bias
    if isinstance(w, Int4Weight):
        rows = x.reshape(-1, x.shape[-1]).to(w.scales_and_zeros.dtype).contiguous()
        if rows.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, w.packed, w.group_size, w.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(rows, w.packed, w.group_size, w.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], w.out_features)
        return y if bias is None else y + bias
    return F.linear(x, w, bias)
