"""The forward pass and greedy decoding of a rank's shard: prefill over a prompt, and a decode step over a static
KV cache that reads its token and position from device buffers, so on CUDA it is captured once as a CUDA graph and
the decode loop is graph replays only.

Prefill runs SDPA (causal) over the prompt and writes the keys/values into cache slots 0..T-1. Decode attends over
the whole static cache with the slots after the position masked, as lpjax's engine does. `--compile MODE` puts
prefill and the whole greedy step through `torch.compile` (inductor, fullgraph, static shapes; `program`); the
compiled step is captured in the same CUDA graph. Every weight product goes through `quantize.linear`, dense or
quantized.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from bench.torch_tp.model import LayerShard, RankModel, StageShard
from bench.torch_tp.quantize import linear
from lpjax.errors import LPJaxError, first_line

Tensor = torch.Tensor


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
    qkv = linear(rms_norm(x, lay.attn_norm, m.config.norm_eps), lay.wqkv, lay.bqkv)
    qk_width = (lay.heads + lay.kv_heads) * hd
    qk = apply_rope(qkv[..., :qk_width].view(B, T, lay.heads + lay.kv_heads, hd), cos, sin)  # q and k at once
    v = qkv[..., qk_width:].view(B, T, lay.kv_heads, hd)
    return linear(attend(lay, qk[:, :, : lay.heads], qk[:, :, lay.heads:], v), lay.wo)


def _mlp_delta(m: RankModel, lay: LayerShard, h: Tensor) -> Tensor:
    gate, up = linear(rms_norm(h, lay.mlp_norm, m.config.norm_eps), lay.w_gate_up, lay.b_gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, lay.w_down)


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
    local = linear(rms_norm(x, m.norm, m.config.norm_eps), m.lm_head).float()
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
# Another torch.compile backend than inductor, for every program of the process and the ranks it starts (the test
# suite's harness run sets aot_eager: Dynamo's whole-graph capture and AOT's functional graph, as for inductor, without
# inductor's minutes of C++ compiling on a CPU; tests/test_torch_baselines.py checks inductor's own programs).
BACKEND_VARIABLE = "LPJAX_TORCH_COMPILE_BACKEND"


def coordinate_descent(m: RankModel) -> bool:
    """Whether m's compiled programs run with inductor's coordinate-descent tuning: with quantized weights, as gpt-fast
    compiles them. Inductor then turns a one-row product into one reduction kernel that reads the int8 weight and
    converts it on the fly; without it the convert is a kernel of its own that writes the whole weight in the compute
    dtype for cuBLAS to read again. (max-autotune-no-cudagraphs has it on anyway.)"""
    return bool(m.compile_mode) and (m.quantization is not None or m.compile_mode == "max-autotune-no-cudagraphs")


def program(fn: Callable, mode: str | None, tuned: bool = False) -> Callable:
    """`fn` as a rank runs it: eager (mode None), or compiled by `torch.compile` with inductor as one whole graph
    (fullgraph) with static shapes (one compile per shape: every prompt length gets its own kernels), `tuned`: with
    coordinate-descent tuning. Compiled once per (fn, mode[, tuning]). (max-autotune-no-cudagraphs with gpt-fast's
    coordinate-descent tuning had not compiled a 7B model after 5 minutes on an H200 machine's 16 cores, so the
    harness's default mode is "default".)"""
    if not mode:
        return fn
    key = (fn, mode, "coordinate_descent_tuning") if tuned else (fn, mode)
    if key not in _PROGRAMS:
        how = {"mode": None if mode == "default" else mode}
        if tuned and mode == "default":  # torch.compile takes a mode or inductor options, not both
            how = {"options": {"coordinate_descent_tuning": True}}
        if backend := os.environ.get(BACKEND_VARIABLE):  # inductor's modes and options are inductor's alone
            how = {"backend": backend}
        _PROGRAMS[key] = torch.compile(fn, fullgraph=True, dynamic=False, **how)
    return _PROGRAMS[key]


def run_prefill(m: RankModel, tokens: Tensor, cache: Cache | None = None, last_only: bool = True) -> Tensor:
    """`prefill` eager or compiled, as the rank model says."""
    return program(prefill, m.compile_mode, coordinate_descent(m))(m, tokens, cache, last_only)


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
        step = program(greedy_step, self.m.compile_mode, coordinate_descent(self.m))
        self.logits = step(self.m, self.cache, self.token, self.pos, self.count, self.out, self.key_pos)

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
            raise LPJaxError(f"CUDA graph capture of the decode step failed ({first_line(e)}); --no-cuda-graph runs "
                             "the same step eagerly") from e

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
    return continue_greedy(dec, run_prefill(m, prompt, dec.cache).argmax(dim=-1), prompt.shape[1], new_tokens)


def continue_greedy(dec: Decoder, first: Tensor, pos: int, new_tokens: int) -> Tensor:
    """After a prefill of `pos` tokens into dec's cache whose greedy next token is `first` [B]: new_tokens - 1
    decode steps. Returns the new tokens [B, new_tokens], `first` included (on the device)."""
    dec.start(first, pos)
    dec.run(new_tokens - 1)
    return torch.cat([first[:, None], dec.out[:, : new_tokens - 1]], dim=1)
