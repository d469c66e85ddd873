"""One rank's shard of the model: which layers and slices it holds, read from a checkpoint or drawn at random.

The split is lpjax's (`lpjax.sharding.Layout`, docs/design.md section 3): N ranks form a (pair=2, tp=N/2) grid; a
sequential layer is split N ways, each layer of an LP pair N/2 ways on its half; KV heads fewer than a split are
replicated (each rank keeps the KV head its query heads read); the LM head is split over the padded vocabulary, the
embedding replicated. Weights are named, shaped and initialised by lpjax's weight schema (`lpjax/schema.py`), in
torch's Linear layout ([out, in], as HF stores them): `wqkv` rows are [q heads | k heads | v heads], `w_gate_up`
rows [gate | up]. `--quantize` stores the layer products (and under int8 the LM head) as `bench.torch_tp.quantize`
says, each rank its own shard, layer by layer as it is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from bench.torch_tp.quantize import PRODUCTS, Quantization, Weight, int4_problem, quantize_weight
from lpjax.config import ModelConfig, read_hf_config
from lpjax.errors import LPJaxError
from lpjax.model import rope_inv_freq
from lpjax.plan import LPPlan, Stage
from lpjax.schema import BY_NAME
from lpjax.sharding import Layout
from lpjax.sources.safetensors import read_safetensors, safetensors_files

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- layout


def check_layout(config: ModelConfig, plan: LPPlan, world: int) -> Layout:
    """lpjax's layout of the model on `world` ranks, or the one-line reason it does not split so."""
    return Layout.for_devices(config, plan, world)


def layer_slots(stage: Stage, rank: int, world: int) -> list[tuple[int, int, int]]:
    """(layer, split, index) of each layer of `stage` that `rank` holds: a sequential layer's 1/world share; one
    layer of a pair split world/2 ways (pair group = rank // (world/2)); on one device both layers of a pair."""
    if not stage.is_pair:
        return [(stage.layers[0], world, rank)]
    if world == 1:
        return [(layer, 1, 0) for layer in stage.layers]
    half = world // 2
    return [(stage.layers[rank // half], half, rank % half)]


def kv_head_range(n_kv: int, split: int, index: int) -> range:
    """KV heads of share `index` of `split`: its own slice, or (fewer KV heads than shares) the one head that its
    query heads read, replicated over split / n_kv shares."""
    if n_kv % split == 0:
        per = n_kv // split
        return range(index * per, (index + 1) * per)
    head = index // (split // n_kv)
    return range(head, head + 1)


def shard_shapes(config: ModelConfig, split: int) -> dict[str, tuple[int, int]]:
    """[out, in] of each layer product (`quantize.PRODUCTS`) on one share of a layer split `split` ways."""
    c, hd = config, config.head_dim
    heads, ffn = c.n_heads // split, c.ffn_dim // split
    kv = len(kv_head_range(c.n_kv_heads, split, 0))
    return {"wqkv": ((heads + 2 * kv) * hd, c.dim), "wo": (c.dim, heads * hd),
            "w_gate_up": (2 * ffn, c.dim), "w_down": (c.dim, ffn)}


def check_quantization(config: ModelConfig, plan: LPPlan, world: int, q: Quantization | None) -> None:
    """The one-line reason a layer's shard cannot be stored as `q` asks on `world` ranks under `plan`, before any
    rank starts (int8 takes any shape; int4's groups must divide each shard's inputs)."""
    if q is None or q.mode != "int4":
        return
    splits = sorted({split for stage in plan.stages for rank in range(world)
                     for _, split, _ in layer_slots(stage, rank, world)})
    for split in splits:
        for name, (n, k) in shard_shapes(config, split).items():
            problem = int4_problem(n, k, q.group_size)
            if problem:
                where = "a whole layer's" if split == 1 else f"a layer split {split} ways, each share's"
                raise LPJaxError(f"--quantize int4 --group-size {q.group_size}: {where} {name} is [{n}, {k}] "
                                 f"(outputs, inputs): {problem}")


# ---------------------------------------------------------------------------------------------- weights


def _to_torch(a: np.ndarray) -> Tensor:
    """A numpy array (bfloat16 as ml_dtypes stores it) as a torch tensor of the same dtype."""
    a = np.array(a)  # a copy out of the memory-mapped file
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class HFState(Mapping):
    """A safetensors checkpoint's tensors by HF name (lpjax's reader: the index, memory-mapped files), each read when
    asked for, so a rank reads only what it keeps."""

    def __init__(self, directory: Path):
        self.tensors: dict[str, np.ndarray] = {}
        for f in safetensors_files(Path(directory)):
            self.tensors.update(read_safetensors(f))

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise LPJaxError(f"checkpoint lacks tensor {name!r}")
        return _to_torch(self.tensors[name])

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def load_hf(directory: str | Path) -> tuple[ModelConfig, HFState]:
    """An HF Llama checkpoint directory as (config, lazily read state dict with HF names)."""
    config, _ = read_hf_config(Path(directory))
    return config, HFState(Path(directory))


class _Source:
    """Where a rank's tensors come from: slices of a checkpoint, or random values of the same shapes as the schema
    initialises them (replicated tensors from a generator seeded alike on every rank, shards from a per-rank one)."""

    def __init__(self, config: ModelConfig, state: Mapping | None, device: torch.device, dtype: torch.dtype,
                 seed: int, rank: int):
        self.config, self.state, self.device, self.dtype = config, state, device, dtype
        self.shared = torch.Generator(device=device).manual_seed(seed)
        self.own = torch.Generator(device=device).manual_seed(seed * 7919 + rank + 1)

    def get(self, name: str, layer: int | None = None, rows=slice(None), cols: slice | None = None,
            replicated: bool = False) -> Tensor:
        """Weight `name` (a schema row) of `layer`, in HF's layout, rows (and columns) sliced."""
        w = BY_NAME[name]
        part = (rows,) if cols is None else (rows, cols)
        if self.state is not None:
            return self.state[w.hf_key(layer)][part].to(self.device, self.dtype).contiguous()
        shape = w.hf_shape(w.shape(self.config))
        size = tuple(len(range(n)[s]) for n, s in zip(shape, part)) + shape[len(part):]
        init = w.init(self.config)
        if not init.std:
            return torch.full(size, init.fill, device=self.device, dtype=self.dtype)
        gen = self.shared if replicated else self.own
        return torch.empty(size, device=self.device, dtype=self.dtype).normal_(0.0, init.std, generator=gen)


@dataclasses.dataclass
class LayerShard:
    """One layer's share on this rank: `heads` query heads, `kv_heads` KV heads, its MLP columns."""

    layer: int
    heads: int
    kv_heads: int
    attn_norm: Tensor
    wqkv: Weight
    bqkv: Tensor | None
    wo: Weight
    mlp_norm: Tensor
    w_gate_up: Weight
    b_gate_up: Tensor | None
    w_down: Weight


@dataclasses.dataclass
class StageShard:
    """The layers of one stage held here; output biases summed over the stage's layers, added once after the
    all-reduce (every rank holds the whole sum)."""

    layers: list[LayerShard]
    attn_bias: Tensor | None
    mlp_bias: Tensor | None


@dataclasses.dataclass
class RankModel:
    config: ModelConfig
    plan: LPPlan
    rank: int
    world: int
    dtype: torch.dtype
    embed: Tensor  # [vocab, dim], replicated
    lm_head: Weight  # [padded vocab / world, dim]: this rank's rows
    norm: Tensor
    stages: list[StageShard]
    inv_freq: Tensor  # float32 [head_dim / 2]
    compile_mode: str | None = None  # None: eager; else the torch.compile mode of prefill and the decode step
    quantization: Quantization | None = None  # None: every weight in the compute dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum over all ranks. Compiled code uses the functional all-reduce: Dynamo traces it (not the in-place
        `dist.all_reduce`) and inductor schedules it inside the graph."""
        if self.world == 1:
            return x
        if self.compile_mode:
            return funcol.all_reduce(x, "sum", dist.group.WORLD)
        dist.all_reduce(x)
        return x


def _layer_shard(c: ModelConfig, src: _Source, layer: int, split: int, index: int) -> LayerShard:
    hd, heads, ffn = c.head_dim, c.n_heads // split, c.ffn_dim // split
    kv = kv_head_range(c.n_kv_heads, split, index)
    q_rows = slice(index * heads * hd, (index + 1) * heads * hd)
    kv_rows = slice(kv.start * hd, kv.stop * hd)
    f = slice(index * ffn, (index + 1) * ffn)
    wqkv = torch.cat([src.get("wq", layer, q_rows), src.get("wk", layer, kv_rows), src.get("wv", layer, kv_rows)])
    bqkv = b_gate_up = None
    if c.attention_bias:
        bqkv = torch.cat([src.get("bq", layer, q_rows), src.get("bk", layer, kv_rows), src.get("bv", layer, kv_rows)])
    if c.mlp_bias:
        b_gate_up = torch.cat([src.get("b_gate", layer, f), src.get("b_up", layer, f)])
    return LayerShard(
        layer=layer, heads=heads, kv_heads=len(kv),
        attn_norm=src.get("attn_norm", layer),
        wqkv=wqkv, bqkv=bqkv,
        wo=src.get("wo", layer, cols=q_rows),
        mlp_norm=src.get("mlp_norm", layer),
        w_gate_up=torch.cat([src.get("w_gate", layer, f), src.get("w_up", layer, f)]),
        b_gate_up=b_gate_up,
        w_down=src.get("w_down", layer, cols=f),
    )


def _quantize_layer(shard: LayerShard, q: Quantization | None) -> LayerShard:
    if q is None:
        return shard
    return dataclasses.replace(shard, **{name: quantize_weight(getattr(shard, name), q, name) for name in PRODUCTS})


def _output_bias(src: _Source, stage: Stage, name: str) -> Tensor:
    parts = [src.get(name, i) for i in stage.layers]
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def build_rank_model(config: ModelConfig, plan: LPPlan, rank: int, world: int, device, dtype: torch.dtype,
                     state: Mapping | None = None, seed: int = 0, compile_mode: str | None = None,
                     quantization: Quantization | None = None) -> RankModel:
    """This rank's shard of the model: slices of `state` (HF names) or, without one, random weights; with
    `quantization`, each layer quantized as soon as it is built (one layer at a time in the compute dtype)."""
    c, device = config, torch.device(device)
    layout = check_layout(c, plan, world)
    check_quantization(c, plan, world, quantization)
    src = _Source(c, state, device, dtype, seed, rank)
    stages = []
    for stage in plan.stages:
        layers = [_quantize_layer(_layer_shard(c, src, layer, split, index), quantization)
                  for layer, split, index in layer_slots(stage, rank, world)]
        stages.append(StageShard(
            layers,
            _output_bias(src, stage, "bo") if c.attention_bias else None,
            _output_bias(src, stage, "b_down") if c.mlp_bias else None,
        ))
    embed = src.get("embedding", replicated=True)
    per = layout.vocab_padded // world
    lo = min(rank * per, c.vocab_size)
    hi = min(lo + per, c.vocab_size)
    head = embed[lo:hi] if c.tied_embeddings else src.get("lm_head", rows=slice(lo, hi))
    if hi - lo < per:  # the padded tail of the vocabulary: zero rows, their logits are dropped
        head = torch.cat([head, head.new_zeros(per - (hi - lo), c.dim)])
    if quantization is not None and quantization.lm_head:
        head = quantize_weight(head, quantization, "lm_head")
    inv_freq = torch.from_numpy(rope_inv_freq(c)).to(device)
    return RankModel(c, plan, rank, world, dtype, embed, head, src.get("norm"), stages, inv_freq, compile_mode,
                     quantization)
