"""PyTorch tensor-parallel Llama with Layer Parallelism: the hand-written baseline lpjax is measured against.

    python -m bench.torch_tp --model llama2-7b --gpus 2 --lp-delta 14 --batch 1 \
        [--compile max-autotune-no-cudagraphs] [--metrics decode,prefill_1024,...] [--repeats 5] [--json-out FILE] \
        [--device cpu] [--check]

The paper's own method, written plainly: one process per GPU (spawned here with torch.multiprocessing),
torch.distributed + NCCL, random weights at the preset's real shapes (values do not change speed; std 0.02 so
nothing overflows in bf16), fused qkv and gate/up matmuls, a static preallocated KV cache, and a decode step captured
once in a CUDA graph that feeds itself: the token, its position and the output slot live in device buffers the graph
updates, so the decode loop is graph replays only, greedy argmax on the device, no host round-trip per token.
Prefill runs eagerly (SDPA, causal).

`--compile MODE` (the harness's `torch-compile`) is the same model written the way gpt-fast writes fast PyTorch:
prefill (per prompt length) and the whole greedy decode step go through `torch.compile` (inductor, fullgraph, static
shapes); the all-reduces and the logits' all-gather become functional collectives so they trace and compile inside
the graph; the compiled step is then captured in the same CUDA graph and replayed.

Layout (docs/design.md section 3, the same as lpjax): N ranks form a (pair=2, tp=N/2) grid.
- A sequential layer is Megatron tensor-parallel over all N ranks: heads and MLP columns split N ways, one
  all-reduce after the attention half and one after the MLP half.
- An LP pair (a, b) puts layer a on ranks 0..N/2-1 and layer b on ranks N/2..N-1, each split N/2 ways. The same two
  all-reduces over all N ranks sum the tensor-parallel partials and the pair at once: 2 a pair instead of 4.
- N = 1: the plain model on one device (a pair runs both its layers there), no collectives.
- KV heads fewer than a layer's split are replicated: each rank keeps the KV head its query heads read.
- Embedding replicated (a lookup of B rows needs no collective); LM head split over the (padded) vocabulary, logits
  all-gathered. Tied embeddings take the LM head's rows from the embedding.
- RoPE in HF's rotate-half layout with `llama3` and `linear` frequency scaling (exact, not approximated).

Metrics (one JSON record each, printed and appended to --json-out by rank 0; medians over --repeats after warm-up):
  prefill_1024, prefill_4096  ms        one prefill of a prompt of that length (cache write + first token), host
                                        clock from a cross-rank sync to the device sync
  decode                      ms/token  128 graph replays after a 128-token prompt's prefill, CUDA events
  generate_4096               s         wall time: prefill of 128 tokens, 4095 replays, tokens copied to the host
                                        (only when asked; --generate-repeats runs, default 1)
  single_token                ms        the token ids [B] copied from the host to the device, one graph replay (the
                                        step and its argmax), the next token ids copied back; cache at ~256
  peak_memory                 GiB       torch.cuda.max_memory_allocated over the configuration's whole run (weights,
                                        caches, graphs, every measured metric), max over ranks; on CPU the
                                        process's peak RSS
Decode attends over the whole static cache (slots after the position masked), whose length is the run's need rounded
up to 128 (384 for decode, 4224 for generate_4096), as lpjax's engine does. `--device cpu` (gloo, float32, eager
decode instead of a graph) exists for tests; `check` / `full_logits` return the full-sequence logits and the cached
greedy tokens for correctness tests, and `--check` runs that comparison on the chosen device. `--no-cuda-graph`
decodes eagerly on CUDA (a fallback if capture fails somewhere; records say cuda_graph: false).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench import records
from bench.records import COMPILE_MODES, DECODE_TOKENS, METRICS, PROMPT_LEN, SINGLE_TOKEN_AT
from lpjax.cli import run as run_cli
from lpjax.config import ModelConfig, preset, read_hf_config, round_up
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan, Stage

IMPL = "torch-tp-cudagraph"
UNITS = {metric: unit for metric, (unit, _) in METRICS.items()}
DEFAULT_METRICS = ("prefill_1024", "prefill_4096", "decode", "single_token", "peak_memory")
DECODE_STEPS = DECODE_TOKENS  # decode: steps timed after the prefill's first token (129 new tokens in all)
GENERATE_TOKENS = 4096
CACHE_MULTIPLE = 128  # static cache lengths are rounded up to this (as lpjax does)
INIT_STD = 0.02
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- shared CLI helpers
# (bench/hf_baselines.py uses these too, so both baselines speak the same records)


def log(*parts) -> None:
    """Progress on stderr."""
    print(*parts, file=sys.stderr, flush=True)


def resolve_model(name: str) -> tuple[str, ModelConfig, Path | None]:
    """`llama2-7b` / `random:llama2-7b` (a preset, random weights) or an HF checkpoint directory -> (record name,
    config, directory or None)."""
    path = Path(name)
    if path.is_dir():
        config, _ = read_hf_config(path)
        return path.name, config, path
    short = name.removeprefix("random:")
    if "/" in name or name.startswith("."):
        raise LPJaxError(f"--model {name}: no such directory (and not a preset name)")
    return short, preset(short), None


def parse_ints(text: str, flag: str, minimum: int = 0) -> list[int]:
    """A comma-separated list of integers (`1` or `1,8`)."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise LPJaxError(f"{flag} {text}: expected integers, e.g. 1 or 1,8") from None
    if not values or any(v < minimum for v in values):
        raise LPJaxError(f"{flag} {text}: expected integers >= {minimum}")
    return values


def parse_metrics(text: str) -> list[str]:
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in UNITS]
    if unknown or not metrics:
        raise LPJaxError(f"--metrics {text}: choose from {', '.join(UNITS)}")
    return metrics


def plans_for(config: ModelConfig, deltas: list[int], lp: str | None) -> list[LPPlan]:
    """`--lp START:END` (one explicit plan) or the benchmark default for each Δ: Δ layers ending two before the
    last (`LPPlan.ending_before_last`)."""
    if lp:
        return [LPPlan.parse(lp, config.n_layers)]
    plans = []
    for d in deltas:
        if d % 2 or d > config.n_layers - 2:
            raise LPJaxError(f"--lp-delta {d}: must be even and at most {config.n_layers - 2} for this model")
        plans.append(LPPlan.ending_before_last(d, config.n_layers))
    return plans


def prompt_tokens(n: int, batch: int, config: ModelConfig, device="cpu") -> Tensor:
    """The benchmark prompt (the same as bench/quick.py): BOS then a fixed pattern, each row the same."""
    bos = config.bos_token_id if config.bos_token_id is not None else 1
    row = [bos % config.vocab_size] + [(100 + i % 150) % config.vocab_size for i in range(n - 1)]
    return torch.tensor([row] * batch, dtype=torch.long, device=device)


def versions(device: str, **extra: str) -> dict:
    v = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if device == "cuda":
        try:
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError, TypeError):
            pass
    return v | extra


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def host_peak_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_record(impl: str, model: str, gpus: int, plan: LPPlan, batch: int, metric: str, samples: list[float],
                device: str, **extra) -> dict:
    """The harness's record (bench.records.make) with the PyTorch context: versions, device."""
    return records.make(impl, model, gpus, plan.delta, plan.spec(), batch, metric, samples,
                        versions=versions(device, **extra.pop("versions", {})), device_name=device_name(device),
                        device=device, **extra)


def emit(record: dict, json_out: str | None) -> None:
    """One JSON line on stdout and, when asked, appended to --json-out."""
    records.append(Path(json_out) if json_out else None, [record])


def check_json_out(path: str | None) -> None:
    if path and not Path(path).resolve().parent.is_dir():
        raise LPJaxError(f"--json-out {path}: directory {Path(path).parent} does not exist")
    if path and Path(path).is_dir():
        raise LPJaxError(f"--json-out {path}: is a directory")


def check_device(device: str, gpus: int) -> None:
    if gpus < 1:
        raise LPJaxError(f"--gpus {gpus}: need at least one")
    if device == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < gpus:
            raise LPJaxError(f"--gpus {gpus}: only {visible} CUDA GPU(s) are visible")


# ---------------------------------------------------------------------------------------------- layout


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


def check_layout(config: ModelConfig, plan: LPPlan, world: int) -> None:
    """One-line reasons why the model does not split over `world` ranks under `plan`."""
    if world > 1 and world % 2:
        raise LPJaxError(f"--gpus {world}: use 1 or an even number (LP puts one layer of a pair on each half)")
    for stage in plan.stages:
        split = world if not stage.is_pair else max(world // 2, 1)
        what = f"{'LP pairs' if stage.is_pair else 'sequential layers'} (split {split} ways on {world} GPUs)"
        for dim, size in (("attention heads", config.n_heads), ("MLP width", config.ffn_dim)):
            if size % split:
                raise LPJaxError(f"cannot split the model: {dim} {size} of {what} is not divisible by {split}")
        kv = config.n_kv_heads
        if kv % split and split % kv:
            raise LPJaxError(f"cannot split the model: {kv} KV heads of {what} neither divide nor are a divisor "
                             f"of {split}")


# ---------------------------------------------------------------------------------------------- weights


class HFState(Mapping):
    """A safetensors checkpoint's tensors by HF name, read one at a time (a rank keeps only its slices)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self._open = safe_open
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            path = directory / "model.safetensors"
            with safe_open(str(path), "pt") as f:
                self.files = {name: path for name in f.keys()}
        else:
            raise LPJaxError(f"{directory}: no model.safetensors (or its index) to read weights from")

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.files:
            raise LPJaxError(f"checkpoint lacks tensor {name!r}")
        with self._open(str(self.files[name]), "pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name) -> bool:
        return name in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def load_hf(directory: str | Path) -> tuple[ModelConfig, HFState]:
    """An HF Llama checkpoint directory as (config, lazily read state dict with HF names)."""
    config, _ = read_hf_config(Path(directory))
    return config, HFState(Path(directory))


class _Source:
    """Where a rank's tensors come from: slices of a checkpoint, or random values of the same shapes (replicated
    tensors from a generator seeded alike on every rank, shards from a per-rank one)."""

    def __init__(self, state: Mapping | None, device: torch.device, dtype: torch.dtype, seed: int, rank: int):
        self.state, self.device, self.dtype = state, device, dtype
        self.shared = torch.Generator(device=device).manual_seed(seed)
        self.own = torch.Generator(device=device).manual_seed(seed * 7919 + rank + 1)

    def matrix(self, name: str, shape: tuple[int, int], rows=slice(None), cols=slice(None),
               replicated: bool = False) -> Tensor:
        if self.state is not None:
            return self.state[name][rows, cols].to(self.device, self.dtype).contiguous()
        size = (len(range(shape[0])[rows]), len(range(shape[1])[cols]))
        gen = self.shared if replicated else self.own
        return torch.empty(size, device=self.device, dtype=self.dtype).normal_(0.0, INIT_STD, generator=gen)

    def vector(self, name: str, size: int, part=slice(None), fill: float = 0.0) -> Tensor:
        if self.state is not None:
            return self.state[name][part].to(self.device, self.dtype).contiguous()
        return torch.full((len(range(size)[part]),), fill, device=self.device, dtype=self.dtype)


@dataclasses.dataclass
class LayerShard:
    """One layer's share on this rank: `heads` query heads, `kv_heads` KV heads, its MLP columns. `wqkv` rows are
    [q heads | k heads | v heads], `w_gate_up` rows [gate | up] (torch Linear layout: [out, in])."""

    layer: int
    heads: int
    kv_heads: int
    attn_norm: Tensor
    wqkv: Tensor
    bqkv: Tensor | None
    wo: Tensor
    mlp_norm: Tensor
    w_gate_up: Tensor
    b_gate_up: Tensor | None
    w_down: Tensor


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
    lm_head: Tensor  # [padded vocab / world, dim]: this rank's rows
    norm: Tensor
    stages: list[StageShard]
    inv_freq: Tensor  # float32 [head_dim / 2]
    compile_mode: str | None = None  # None: eager; else the torch.compile mode of prefill and the decode step

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
    p = f"model.layers.{layer}."
    a, m = p + "self_attn.", p + "mlp."
    q_shape, kv_shape = (c.n_heads * hd, c.dim), (c.n_kv_heads * hd, c.dim)
    wqkv = torch.cat([src.matrix(a + "q_proj.weight", q_shape, q_rows),
                      src.matrix(a + "k_proj.weight", kv_shape, kv_rows),
                      src.matrix(a + "v_proj.weight", kv_shape, kv_rows)])
    bqkv = b_gate_up = None
    if c.attention_bias:
        bqkv = torch.cat([src.vector(a + "q_proj.bias", c.n_heads * hd, q_rows),
                          src.vector(a + "k_proj.bias", c.n_kv_heads * hd, kv_rows),
                          src.vector(a + "v_proj.bias", c.n_kv_heads * hd, kv_rows)])
    if c.mlp_bias:
        b_gate_up = torch.cat([src.vector(m + "gate_proj.bias", c.ffn_dim, f),
                               src.vector(m + "up_proj.bias", c.ffn_dim, f)])
    return LayerShard(
        layer=layer, heads=heads, kv_heads=len(kv),
        attn_norm=src.vector(p + "input_layernorm.weight", c.dim, fill=1.0),
        wqkv=wqkv, bqkv=bqkv,
        wo=src.matrix(a + "o_proj.weight", (c.dim, c.n_heads * hd), cols=q_rows),
        mlp_norm=src.vector(p + "post_attention_layernorm.weight", c.dim, fill=1.0),
        w_gate_up=torch.cat([src.matrix(m + "gate_proj.weight", (c.ffn_dim, c.dim), f),
                             src.matrix(m + "up_proj.weight", (c.ffn_dim, c.dim), f)]),
        b_gate_up=b_gate_up,
        w_down=src.matrix(m + "down_proj.weight", (c.dim, c.ffn_dim), cols=f),
    )


def _output_bias(c: ModelConfig, src: _Source, stage: Stage, name: str) -> Tensor:
    parts = [src.vector(f"model.layers.{i}.{name}.bias", c.dim) for i in stage.layers]
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def rope_inv_freq(c: ModelConfig, device) -> Tensor:
    """HF's rotary frequencies (float32, the same operations as transformers), with `llama3` / `linear` scaling."""
    hd = c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = c.rope_scaling
    if rs is not None and rs.kind == "linear":
        inv = inv / rs.factor
    elif rs is not None:  # llama3
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv.to(device)


def build_rank_model(config: ModelConfig, plan: LPPlan, rank: int, world: int, device, dtype: torch.dtype,
                     state: Mapping | None = None, seed: int = 0, compile_mode: str | None = None) -> RankModel:
    """This rank's shard of the model: slices of `state` (HF names) or, without one, random weights."""
    c, device = config, torch.device(device)
    src = _Source(state, device, dtype, seed, rank)
    stages = []
    for stage in plan.stages:
        layers = [_layer_shard(c, src, layer, split, index) for layer, split, index in layer_slots(stage, rank, world)]
        stages.append(StageShard(
            layers,
            _output_bias(c, src, stage, "self_attn.o_proj") if c.attention_bias else None,
            _output_bias(c, src, stage, "mlp.down_proj") if c.mlp_bias else None,
        ))
    embed = src.matrix("model.embed_tokens.weight", (c.vocab_size, c.dim), replicated=True)
    per = round_up(c.vocab_size, world) // world
    lo = min(rank * per, c.vocab_size)
    hi = min(lo + per, c.vocab_size)
    head = embed[lo:hi] if c.tied_embeddings else src.matrix("lm_head.weight", (c.vocab_size, c.dim), slice(lo, hi))
    if hi - lo < per:  # the padded tail of the vocabulary: zero rows, their logits are dropped
        head = torch.cat([head, head.new_zeros(per - (hi - lo), c.dim)])
    return RankModel(c, plan, rank, world, dtype, embed, head, src.vector("model.norm.weight", c.dim, fill=1.0),
                     stages, rope_inv_freq(c, device), compile_mode)


# ---------------------------------------------------------------------------------------------- forward


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_tables(m: RankModel, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos / sin [T, 1, head_dim] for positions [T], computed in float32 as HF does, then cast."""
    angles = positions.float()[:, None] * m.inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(m.dtype)[:, None], emb.sin().to(m.dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on x [B, T, heads, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _add(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


Attend = Callable[[LayerShard, Tensor, Tensor, Tensor], Tensor]


def _attention_delta(m: RankModel, lay: LayerShard, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
    """A_l(n1_l(x)) for this rank's heads of layer l: a partial sum, before the all-reduce and the output bias."""
    B, T, _ = x.shape
    hd = m.config.head_dim
    qkv = F.linear(rms_norm(x, lay.attn_norm, m.config.norm_eps), lay.wqkv, lay.bqkv)
    qk_width = (lay.heads + lay.kv_heads) * hd
    qk = apply_rope(qkv[..., :qk_width].view(B, T, lay.heads + lay.kv_heads, hd), cos, sin)  # q and k at once
    v = qkv[..., qk_width:].view(B, T, lay.kv_heads, hd)
    return F.linear(attend(lay, qk[:, :, : lay.heads], qk[:, :, lay.heads:], v), lay.wo)


def _mlp_delta(m: RankModel, lay: LayerShard, h: Tensor) -> Tensor:
    gate, up = F.linear(rms_norm(h, lay.mlp_norm, m.config.norm_eps), lay.w_gate_up, lay.b_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, lay.w_down)


def _stage(m: RankModel, s: StageShard, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
    """h = x + sum A(n1(x)); out = h + sum M(n2(h)), each sum over the stage's layers and all ranks (one
    all-reduce per half)."""
    a = m.all_reduce(_add([_attention_delta(m, lay, x, cos, sin, attend) for lay in s.layers]))
    if s.attn_bias is not None:
        a = a + s.attn_bias
    h = x + a
    f = m.all_reduce(_add([_mlp_delta(m, lay, h) for lay in s.layers]))
    if s.mlp_bias is not None:
        f = f + s.mlp_bias
    return h + f


def _logits(m: RankModel, x: Tensor) -> Tensor:
    """float32 logits [..., vocab]: this rank's vocabulary rows, all-gathered."""
    local = F.linear(rms_norm(x, m.norm, m.config.norm_eps), m.lm_head).float()
    if m.world > 1:
        if m.compile_mode:  # traceable; gathers along a new leading dim of ranks
            gathered = funcol.all_gather_tensor(local.contiguous(), 0, dist.group.WORLD).view(m.world, *local.shape)
        elif local.is_cuda:
            gathered = local.new_empty((m.world, *local.shape))
            dist.all_gather_into_tensor(gathered, local.contiguous())
        else:  # gloo
            parts = [torch.empty_like(local) for _ in range(m.world)]
            dist.all_gather(parts, local.contiguous())
            gathered = torch.stack(parts)
        local = gathered.movedim(0, -2).reshape(*local.shape[:-1], -1)
    return local[..., : m.config.vocab_size]


Cache = dict  # layer id -> (keys, values), each [batch, local KV heads, length, head_dim]


def alloc_cache(m: RankModel, batch: int, length: int) -> Cache:
    hd = m.config.head_dim
    return {lay.layer: tuple(torch.zeros(batch, lay.kv_heads, length, hd, dtype=m.dtype, device=m.device)
                             for _ in range(2))
            for s in m.stages for lay in s.layers}


def prefill(m: RankModel, tokens: Tensor, cache: Cache | None = None, last_only: bool = True) -> Tensor:
    """Causal forward of tokens [B, T] from position 0, writing keys/values into cache slots 0..T-1 when given.
    Returns float32 logits [B, V] of the last position (or [B, T, V])."""
    B, T = tokens.shape
    cos, sin = rope_tables(m, torch.arange(T, device=m.device))

    def attend(lay: LayerShard, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, KV, T, hd]
        if cache is not None:
            kc, vc = cache[lay.layer]
            kc[:, :, :T].copy_(k)
            vc[:, :, :T].copy_(v)
        if lay.kv_heads != lay.heads:
            g = lay.heads // lay.kv_heads
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
        return out.transpose(1, 2).reshape(B, T, lay.heads * m.config.head_dim)

    x = F.embedding(tokens, m.embed)
    for s in m.stages:
        x = _stage(m, s, x, cos, sin, attend)
    return _logits(m, x[:, -1] if last_only else x)


def decode_step(m: RankModel, cache: Cache, token: Tensor, pos: Tensor, key_pos: Tensor) -> Tensor:
    """One token per row (token [B]) at cache slot pos ([1], on the device), attending over the whole static cache
    with the slots after pos masked. No host syncs: the step is captured in a CUDA graph as is."""
    B = token.shape[0]
    hd = m.config.head_dim
    cos, sin = rope_tables(m, pos)
    future = (key_pos > pos)[None, None, None, :]  # [1, 1, 1, L]
    scale = 1.0 / math.sqrt(hd)

    def attend(lay: LayerShard, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kc, vc = cache[lay.layer]
        kc.index_copy_(2, pos, k.transpose(1, 2))
        vc.index_copy_(2, pos, v.transpose(1, 2))
        qg = q.reshape(B, lay.kv_heads, lay.heads // lay.kv_heads, hd) * scale  # query head = kv head * G + g
        scores = torch.matmul(qg, kc.transpose(2, 3)).masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(vc.dtype)
        return torch.matmul(probs, vc).reshape(B, 1, lay.heads * hd)

    x = F.embedding(token[:, None], m.embed)
    for s in m.stages:
        x = _stage(m, s, x, cos, sin, attend)
    return _logits(m, x[:, 0])


_PROGRAMS: dict = {}


def program(fn: Callable, mode: str | None) -> Callable:
    """`fn` as a rank runs it: eager (mode None), or compiled by `torch.compile` with inductor as one whole graph
    (fullgraph) with static shapes (one compile per shape: every prompt length gets its own kernels). Compiled once
    per (fn, mode). (max-autotune-no-cudagraphs with gpt-fast's coordinate-descent tuning had not compiled a 7B
    model after 5 minutes on an H200 machine's 16 cores, so the harness's default mode is "default".)"""
    if not mode:
        return fn
    if (fn, mode) not in _PROGRAMS:
        _PROGRAMS[fn, mode] = torch.compile(fn, fullgraph=True, dynamic=False,
                                            mode=None if mode == "default" else mode)
    return _PROGRAMS[fn, mode]


def run_prefill(m: RankModel, tokens: Tensor, cache: Cache | None = None, last_only: bool = True) -> Tensor:
    """`prefill` eager or compiled, as the rank model says."""
    return program(prefill, m.compile_mode)(m, tokens, cache, last_only)


def greedy_step(m: RankModel, cache: Cache, token: Tensor, pos: Tensor, count: Tensor, out: Tensor,
                key_pos: Tensor) -> Tensor:
    """One greedy decode step with its bookkeeping on the device: the argmax replaces `token` and is written to
    `out` at `count`; `pos` and `count` advance. Returns the step's logits [B, V]."""
    logits = decode_step(m, cache, token, pos, key_pos)
    nxt = logits.argmax(dim=-1)
    token.copy_(nxt)
    out.index_copy_(1, count, nxt[:, None])
    count.add_(1)
    pos.add_(1)
    return logits


class Decoder:
    """Greedy decoding over a static cache of `length` slots. One step reads its token and position from device
    buffers and writes the next token, position and output slot back, so on CUDA it is captured once as a graph and
    the loop is replays only (no host work per token beyond the launch)."""

    def __init__(self, m: RankModel, batch: int, length: int, cuda_graph: bool = True):
        self.m, self.length = m, length
        self.cache = alloc_cache(m, batch, length)
        dev = m.device
        self.token = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.count = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(batch, length, dtype=torch.long, device=dev)
        self.key_pos = torch.arange(length, device=dev)
        self.logits: Tensor | None = None  # [B, V] float32 of the last step
        self.graph = None
        if dev.type == "cuda" and cuda_graph:
            self._capture()

    def _step(self) -> None:
        # the captured step's logits tensor is the graph's static output: every replay rewrites it in place
        self.logits = program(greedy_step, self.m.compile_mode)(self.m, self.cache, self.token, self.pos, self.count,
                                                                self.out, self.key_pos)

    def _capture(self) -> None:
        """The documented recipe: warm up on a side stream (cuBLAS workspaces, NCCL, allocator; compiled code
        compiles in the first warm-up step), then capture. 'thread_local' keeps the NCCL watchdog thread's event
        queries from invalidating the capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self._step()
            torch.cuda.synchronize()
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise LPJaxError(f"CUDA graph capture of the decode step failed ({first}); --no-cuda-graph runs the "
                             "same step eagerly") from e

    def start(self, first: Tensor, pos: int) -> None:
        """Continue after a prefill of `pos` tokens whose greedy next token is `first` [B]."""
        self.token.copy_(first)
        self.pos.fill_(pos)
        self.count.zero_()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()


def generate(m: RankModel, dec: Decoder, prompt: Tensor, new_tokens: int) -> Tensor:
    """Greedy: prefill then new_tokens - 1 decode steps. Returns the new tokens [B, new_tokens] (on the device)."""
    if prompt.shape[1] + new_tokens > dec.length:
        raise LPJaxError(f"{prompt.shape[1]} + {new_tokens} tokens do not fit a cache of {dec.length}")
    first = run_prefill(m, prompt, dec.cache).argmax(dim=-1)
    dec.start(first, prompt.shape[1])
    dec.run(new_tokens - 1)
    return torch.cat([first[:, None], dec.out[:, : new_tokens - 1]], dim=1)


# ---------------------------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a rank needs (picklable: sent to spawned processes)."""

    kind: str  # "bench" | "check"
    model: str  # record name
    config: ModelConfig
    directory: str | None
    world: int
    device: str
    dtype: str
    plans: tuple[LPPlan, ...]
    seed: int = 0
    batches: tuple[int, ...] = (1,)
    metrics: tuple[str, ...] = DEFAULT_METRICS
    repeats: int = 5
    generate_repeats: int = 1
    json_out: str | None = None
    cuda_graph: bool = True
    impl: str = IMPL
    compile_mode: str | None = None  # torch.compile mode of prefill and the decode step (None: eager)
    tokens: tuple[tuple[int, ...], ...] = ()  # check: the prompt rows
    new_tokens: int = 0  # check: greedy tokens to generate through the cached path
    result_path: str | None = None  # check: where rank 0 saves its result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: Job) -> None:
    """Run `job` on job.world ranks: in this process for one, else one spawned process per rank (their environment
    is set here for the spawn and restored after)."""
    if job.world == 1:
        _run_rank(0, job)
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           # NVLink SHARP (multicast) stays off on the GPU machines unless the caller chose otherwise
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(_worker, args=(job,), nprocs=job.world, join=True)
    except mp.ProcessRaisedException as e:
        text = str(e).strip()
        print(text, file=sys.stderr)
        raise LPJaxError(f"a rank failed: {text.splitlines()[-1] if text else e.__class__.__name__}") from None
    except mp.ProcessExitedException as e:
        raise LPJaxError(f"a rank exited early ({e})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker(rank: int, job: Job) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.world))
    _run_rank(rank, job)


def _run_rank(rank: int, job: Job) -> None:
    cuda = job.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    if job.world > 1:
        kwargs = {"device_id": torch.device("cuda", rank)} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=job.world, **kwargs)
    try:
        with torch.inference_mode():
            if job.world > 1:  # communicators up before anything is timed or captured
                warm = torch.ones(1, device=job.device)
                dist.all_reduce(warm)
                _device_sync(job.device)
            (_check_rank if job.kind == "check" else _bench_rank)(rank, job)
    finally:
        if job.world > 1:
            gc.collect()  # graphs that captured collectives go before the communicator
            _device_sync(job.device)
            dist.destroy_process_group()


def _build(job: Job, rank: int, plan: LPPlan) -> RankModel:
    state = HFState(Path(job.directory)) if job.directory else None
    return build_rank_model(job.config, plan, rank, job.world, job.device if job.device == "cpu" else
                            torch.device("cuda", rank), DTYPES[job.dtype], state, job.seed, job.compile_mode)


def _device_sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- correctness


def _check_rank(rank: int, job: Job) -> None:
    results = []
    tokens = torch.tensor(job.tokens, dtype=torch.long, device=job.device if job.device == "cpu" else "cuda")
    for plan in job.plans:
        m = _build(job, rank, plan)
        result = {"lp": plan.spec(), "logits": run_prefill(m, tokens, last_only=False).cpu()}
        if job.new_tokens:
            T, n = tokens.shape[1], job.new_tokens
            dec = Decoder(m, tokens.shape[0], round_up(T + n, CACHE_MULTIPLE), job.cuda_graph)
            new = generate(m, dec, tokens, n)
            # the same sequence through the full forward: its argmax at each position must be the next new token
            full = run_prefill(m, torch.cat([tokens, new[:, :-1]], dim=1), last_only=False)[:, T - 1:]
            top, low = full.max(dim=-1).values, full.min(dim=-1).values
            gap = (top - full.gather(-1, new[..., None])[..., 0]) / (top - low)  # 0 where the choices agree
            result |= {"generated": new.cpu(), "full_argmax": full.argmax(dim=-1).cpu(), "gap": gap.cpu()}
            del dec
        results.append(result)
        del m
    if rank == 0:
        torch.save(results, job.result_path)


def check(model: str, tokens, lps: tuple[str, ...] | list[str] = ("",), world: int = 1, new_tokens: int = 0,
          device: str = "cpu", dtype: str | None = None, seed: int = 0, cuda_graph: bool = True,
          compile_mode: str | None = None) -> list[dict]:
    """For each plan: the full-sequence float32 logits [B, T, V] of `tokens` on `world` ranks and, with
    new_tokens, the greedy tokens of the cached path (prefill + decode steps; graph replays on CUDA) with the
    argmax of the full forward over the same sequence. `model`: a preset name or an HF checkpoint directory."""
    name, config, directory = resolve_model(str(model))
    check_device(device, world)
    plans = tuple(LPPlan.parse(lp, config.n_layers) for lp in lps)
    for plan in plans:
        check_layout(config, plan, world)
    rows = tuple(tuple(int(t) for t in row) for row in (tokens.tolist() if hasattr(tokens, "tolist") else tokens))
    with tempfile.TemporaryDirectory(prefix="torch-tp-check-") as tmp:
        job = Job("check", name, config, str(directory) if directory else None, world, device,
                  dtype or ("float32" if device == "cpu" else "bfloat16"), plans, seed, tokens=rows,
                  new_tokens=new_tokens, result_path=os.path.join(tmp, "result.pt"), cuda_graph=cuda_graph,
                  compile_mode=compile_mode)
        launch(job)
        return torch.load(job.result_path)


def full_logits(model: str, tokens, lp: str = "", world: int = 1, device: str = "cpu",
                dtype: str | None = None) -> Tensor:
    """Full-sequence float32 logits [B, T, V] of the tensor-parallel LP model."""
    return check(model, tokens, (lp,), world, 0, device, dtype)[0]["logits"]


# ---------------------------------------------------------------------------------------------- benchmark


class _Clock:
    """Cross-rank start line and timing on one device kind."""

    def __init__(self, m: RankModel, device: str):
        self.m, self.device = m, device
        self.flag = torch.zeros(1, device=m.device)

    def sync_all(self) -> None:
        """Every rank idle and past the same point: the next timed region starts together."""
        _device_sync(self.device)
        if self.m.world > 1:
            dist.all_reduce(self.flag)
        _device_sync(self.device)

    def wall(self, fn: Callable[[], object]) -> float:
        """Seconds from a common start to the end of fn's device work."""
        self.sync_all()
        t0 = time.perf_counter()
        fn()
        _device_sync(self.device)
        return time.perf_counter() - t0

    def device_ms(self, fn: Callable[[], object]) -> float:
        """Milliseconds of fn's device work (CUDA events; host clock on CPU)."""
        self.sync_all()
        if self.device != "cuda":
            return 1000 * self.wall(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def _decode_samples(m: RankModel, dec: Decoder, clock: _Clock, batch: int, repeats: int) -> list[float]:
    prompt = prompt_tokens(PROMPT_LEN, batch, m.config, m.device)
    samples = []
    for i in range(repeats + 1):  # the first run is the warm-up
        dec.start(run_prefill(m, prompt, dec.cache).argmax(dim=-1), PROMPT_LEN)
        ms = clock.device_ms(lambda: dec.run(DECODE_STEPS))
        if i:
            samples.append(ms / DECODE_STEPS)
    return samples


def _single_token_samples(m: RankModel, dec: Decoder, clock: _Clock, batch: int, repeats: int) -> list[float]:
    """records.SINGLE_TOKEN: the current token ids [B] copied from the host into the step's input buffer, one graph
    replay (the step, greedy argmax included), the next token ids copied back to the host."""
    prompt = prompt_tokens(SINGLE_TOKEN_AT, batch, m.config, m.device)
    dec.start(run_prefill(m, prompt, dec.cache).argmax(dim=-1), SINGLE_TOKEN_AT)
    dec.run(2)  # warm
    current = dec.token.cpu()

    def step() -> None:
        nonlocal current
        dec.token.copy_(current)
        dec.run(1)
        current = dec.token.cpu()

    return [1000 * clock.wall(step) for _ in range(repeats)]


def _prefill_samples(m: RankModel, clock: _Clock, batch: int, length: int, repeats: int) -> list[float]:
    cache = alloc_cache(m, batch, round_up(length, CACHE_MULTIPLE))
    prompt = prompt_tokens(length, batch, m.config, m.device)

    def run() -> None:
        run_prefill(m, prompt, cache).argmax(dim=-1)

    return [1000 * clock.wall(run) for _ in range(repeats + 1)][1:]  # the first is the warm-up


def _generate_samples(m: RankModel, clock: _Clock, batch: int, repeats: int, cuda_graph: bool) -> list[float]:
    dec = Decoder(m, batch, round_up(PROMPT_LEN + GENERATE_TOKENS, CACHE_MULTIPLE), cuda_graph)
    prompt = prompt_tokens(PROMPT_LEN, batch, m.config, m.device)
    generate(m, dec, prompt, 8).cpu()  # warm

    def run() -> None:
        generate(m, dec, prompt, GENERATE_TOKENS).cpu()

    return [clock.wall(run) for _ in range(repeats)]


def _peak_gib(m: RankModel, device: str) -> float:
    local = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else host_peak_gib()
    peak = torch.tensor([local], dtype=torch.float64, device=m.device)
    if m.world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak.item())


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _bench_config(rank: int, job: Job, m: RankModel, clock: _Clock, batch: int) -> None:
    """Every asked metric of one (plan, batch) configuration, in an order that reuses the decode graph."""
    metrics = set(job.metrics)
    say = log if rank == 0 else (lambda *a: None)
    extra = {"dtype": job.dtype, "cuda_graph": job.device == "cuda" and job.cuda_graph, "compile": job.compile_mode,
             "embedding": "replicated embedding, vocabulary-parallel LM head",
             "rope": job.config.rope_scaling.kind if job.config.rope_scaling else "default"}

    def emit_metric(metric: str, samples: list[float]) -> None:
        rec = make_record(job.impl, job.model, job.world, m.plan, batch, metric, samples, job.device, **extra)
        say(f"[torch-tp] batch {batch} {metric}: {rec['value']} {rec['unit']}")
        if rank == 0:
            emit(rec, job.json_out)

    only_peak = metrics == {"peak_memory"}  # then the decode workload runs once, untimed, for a meaningful peak
    if metrics & {"decode", "single_token"} or only_peak:
        longest = max(PROMPT_LEN + DECODE_STEPS + 1, SINGLE_TOKEN_AT + 3 + job.repeats)
        t0 = time.perf_counter()
        dec = Decoder(m, batch, round_up(longest, CACHE_MULTIPLE), job.cuda_graph)
        say(f"[torch-tp] batch {batch}: decode step {'captured in a CUDA graph' if dec.graph else 'ready'} "
            f"({time.perf_counter() - t0:.1f} s, cache of {dec.length})")
        if "decode" in metrics or only_peak:
            samples = _decode_samples(m, dec, clock, batch, 1 if only_peak else job.repeats)
            if not only_peak:
                emit_metric("decode", samples)
        if "single_token" in metrics:
            emit_metric("single_token", _single_token_samples(m, dec, clock, batch, job.repeats))
        del dec
    if "generate_4096" in metrics:
        emit_metric("generate_4096", _generate_samples(m, clock, batch, job.generate_repeats, job.cuda_graph))
    for length in (1024, 4096):
        if f"prefill_{length}" in metrics:
            emit_metric(f"prefill_{length}", _prefill_samples(m, clock, batch, length, job.repeats))
    if "peak_memory" in metrics:
        emit_metric("peak_memory", [_peak_gib(m, job.device)])


def _bench_rank(rank: int, job: Job) -> None:
    for plan in job.plans:
        _free(job.device)
        t0 = time.perf_counter()
        m = _build(job, rank, plan)
        _device_sync(job.device)
        if rank == 0:
            log(f"[torch-tp] {job.model}: {job.world} {job.device} rank(s), LP {plan.describe()}, {job.dtype}, "
                f"weights ready in {time.perf_counter() - t0:.1f} s")
        clock = _Clock(m, job.device)
        for i, batch in enumerate(job.batches):
            if i:
                _free(job.device)
            _bench_config(rank, job, m, clock, batch)
        del m, clock


# ---------------------------------------------------------------------------------------------- CLI


def add_runner_args(p: argparse.ArgumentParser, gpus_help: str) -> None:
    """The flags every PyTorch runner shares with the harness (bench.run passes them)."""
    p.add_argument("--model", default="llama2-7b", help="preset (llama2-7b, llama3-8b, llama3.2-3b, tiny; "
                                                         "random weights) or an HF checkpoint directory")
    p.add_argument("--gpus", type=int, default=1, help=gpus_help)
    p.add_argument("--lp-delta", default="0", help="Δ, or a list 0,14: paired layers ending two before the last")
    p.add_argument("--lp", default=None, metavar="START:END", help="an explicit plan instead of --lp-delta")
    p.add_argument("--batch", default="1", help="batch size, or a list 1,8")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"subset of {', '.join(UNITS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per metric (median reported)")
    p.add_argument("--generate-repeats", type=int, default=1, help="timed runs of generate_4096")
    p.add_argument("--json-out", default=None, help="append one JSON line per metric to this file")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.torch_tp", description=__doc__.splitlines()[0])
    add_runner_args(p, "ranks: GPUs (or gloo processes with --device cpu)")
    p.add_argument("--impl-name", default=IMPL, help=f"impl in the records (default {IMPL})")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help=f"torch.compile prefill and the decode step (inductor, fullgraph; "
                        f"{' or '.join(COMPILE_MODES)}); the compiled step is still captured in the CUDA graph")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode eagerly on CUDA (a fallback; records say cuda_graph: false)")
    p.add_argument("--check", action="store_true",
                   help="instead of timing: greedy tokens of the cached (graph) path vs the full forward's argmax")
    return p.parse_args(argv)


def _run_check(name: str, args: argparse.Namespace, plans: list[LPPlan]) -> int:
    """Greedy tokens of the cached path against the full forward over the same sequence. In float32 they must
    agree exactly; in bf16 random weights leave near-ties, so a token may differ, but the full forward must rate it
    within 5% of its logit range of the best (a broken cache or graph picks tokens rated like any other)."""
    config = resolve_model(args.model)[1]
    tokens = prompt_tokens(32, 2, config).tolist()
    results = check(args.model, tokens, [p.spec() for p in plans], args.gpus, 16, args.device, args.dtype,
                    args.seed, not args.no_cuda_graph, args.compile)
    exact = (args.dtype or ("float32" if args.device == "cpu" else "bfloat16")) == "float32"
    ok = True
    for plan, r in zip(plans, results):
        agree = float((r["generated"] == r["full_argmax"]).float().mean())
        gap = float(r["gap"].max())
        good = agree == 1.0 if exact else gap <= 0.05
        ok &= good
        print(json.dumps({"check": "cached greedy decode vs full-forward argmax", "impl": args.impl_name, "model": name,
                          "gpus": args.gpus, "lp": plan.spec(), "lp_delta": plan.delta, "device": args.device,
                          "agreement": round(agree, 4), "max_gap": round(gap, 4), "ok": good}), flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name, config, directory = resolve_model(args.model)
    check_device(args.device, args.gpus)
    check_json_out(args.json_out)
    if args.repeats < 1 or args.generate_repeats < 1:
        raise LPJaxError("--repeats and --generate-repeats must be at least 1")
    plans = plans_for(config, parse_ints(args.lp_delta, "--lp-delta"), args.lp)
    for plan in plans:
        check_layout(config, plan, args.gpus)
    if args.check:
        return _run_check(name, args, plans)
    job = Job("bench", name, config, str(directory) if directory else None, args.gpus, args.device,
              args.dtype or ("bfloat16" if args.device == "cuda" else "float32"), tuple(plans), args.seed,
              tuple(parse_ints(args.batch, "--batch", 1)), tuple(parse_metrics(args.metrics)), args.repeats,
              args.generate_repeats, args.json_out, not args.no_cuda_graph, args.impl_name, args.compile)
    launch(job)
    return 0


if __name__ == "__main__":
    run_cli(main)
