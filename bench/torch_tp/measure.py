"""The timed metrics of the PyTorch baselines (`bench.records.METRICS`; one JSON record each, printed and appended to
--json-out by rank 0; medians over --repeats after a warm-up):

    prefill_1024, prefill_4096  ms        one prefill of a prompt of that length (cache write + first token), host
                                          clock from a cross-rank sync to the device sync
    decode                      ms/token  128 graph replays (--decode-tokens) after a 128-token prompt's prefill,
                                          CUDA events
    generate_4096               s         wall time: prefill of 128 tokens, 4095 replays, tokens copied to the host
                                          (only when asked; --long-repeats runs, default 1)
    single_token                ms        one graph replay (the step and its argmax; its input, the token ids the host
                                          was handed, stays on the device), the next token ids copied back to the
                                          host; cache from 256
    peak_memory                 GiB       torch.cuda.max_memory_allocated over the configuration's whole run
                                          (weights, caches, graphs, every measured metric), max over ranks; on CPU
                                          the process's peak RSS

Decode attends over the whole static cache, whose length is the run's need rounded up to lpjax's cache multiple
(384 for decode, 4224 for generate_4096), as lpjax's engine does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from bench.common import emit, host_peak_gib, log
from bench.records import GENERATE_TOKENS, PROMPT_LEN, SINGLE_TOKEN_AT
from bench.torch_tp.context import free, make_record, prompt_tokens, sync
from bench.torch_tp.decoder import Decoder, alloc_cache, coordinate_descent, generate, run_prefill
from bench.torch_tp.launch import Job, build
from bench.torch_tp.model import RankModel
from lpjax.config import round_up
from lpjax.engine import CACHE_MULTIPLE


class _Clock:
    """Cross-rank start line and timing on one device kind."""

    def __init__(self, m: RankModel, device: str):
        self.m, self.device = m, device
        self.flag = torch.zeros(1, device=m.device)

    def sync_all(self) -> None:
        """Every rank idle and past the same point: the next timed region starts together."""
        sync(self.device)
        if self.m.world > 1:
            dist.all_reduce(self.flag)
        sync(self.device)

    def wall(self, fn: Callable[[], object]) -> float:
        """Seconds from a common start to the end of fn's device work."""
        self.sync_all()
        t0 = time.perf_counter()
        fn()
        sync(self.device)
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


def _decode_samples(m: RankModel, dec: Decoder, clock: _Clock, batch: int, repeats: int, steps: int) -> list[float]:
    prompt = prompt_tokens(PROMPT_LEN, batch, m.config, m.device)
    samples = []
    for i in range(repeats + 1):  # the first run is the warm-up
        dec.start(run_prefill(m, prompt, dec.cache).argmax(dim=-1), PROMPT_LEN)
        ms = clock.device_ms(lambda: dec.run(steps))
        if i:
            samples.append(ms / steps)
    return samples


def _single_token_samples(m: RankModel, dec: Decoder, clock: _Clock, batch: int, repeats: int) -> list[float]:
    """records.SINGLE_TOKEN: one graph replay (the step, greedy argmax included) whose input is the token ids the
    host was handed last, still in the graph's input buffer; the next token ids copied back to the host."""
    prompt = prompt_tokens(SINGLE_TOKEN_AT, batch, m.config, m.device)
    dec.start(run_prefill(m, prompt, dec.cache).argmax(dim=-1), SINGLE_TOKEN_AT)
    dec.run(2)  # warm

    def step() -> None:
        dec.run(1)
        dec.token.cpu()

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


def _bench_config(rank: int, job: Job, m: RankModel, clock: _Clock, batch: int) -> None:
    """Every asked metric of one (plan, batch) configuration, in an order that reuses the decode graph."""
    metrics = set(job.metrics)
    say = log if rank == 0 else (lambda *a: None)
    extra = {"dtype": job.dtype, "cuda_graph": job.device == "cuda" and job.cuda_graph, "compile": job.compile_mode,
             "coordinate_descent_tuning": coordinate_descent(m),
             "embedding": "replicated embedding, vocabulary-parallel LM head",
             "rope": job.config.rope_scaling.kind if job.config.rope_scaling else "default",
             **(job.quantization.record() if job.quantization else {"quantize": None, "group_size": None})}

    def emit_metric(metric: str, samples: list[float]) -> None:
        counted = {"decode_tokens": job.decode_tokens} if metric == "decode" else {}
        rec = make_record(job.impl, job.model, job.world, m.plan, batch, metric, samples, job.device, **extra,
                          **counted)
        say(f"[torch-tp] batch {batch} {metric}: {rec['value']} {rec['unit']}")
        if rank == 0:
            emit(rec, job.json_out)

    only_peak = metrics == {"peak_memory"}  # then the decode workload runs once, untimed, for a meaningful peak
    if metrics & {"decode", "single_token"} or only_peak:
        longest = max(PROMPT_LEN + job.decode_tokens + 1, SINGLE_TOKEN_AT + 3 + job.repeats)
        t0 = time.perf_counter()
        dec = Decoder(m, batch, round_up(longest, CACHE_MULTIPLE), job.cuda_graph)
        say(f"[torch-tp] batch {batch}: decode step {'captured in a CUDA graph' if dec.graph else 'ready'} "
            f"({time.perf_counter() - t0:.1f} s, cache of {dec.length})")
        if "decode" in metrics or only_peak:
            samples = _decode_samples(m, dec, clock, batch, 1 if only_peak else job.repeats, job.decode_tokens)
            if not only_peak:
                emit_metric("decode", samples)
        if "single_token" in metrics:
            emit_metric("single_token", _single_token_samples(m, dec, clock, batch, job.repeats))
        del dec
    if "generate_4096" in metrics:
        emit_metric("generate_4096", _generate_samples(m, clock, batch, job.long_repeats, job.cuda_graph))
    for length in (1024, 4096):
        if f"prefill_{length}" in metrics:
            emit_metric(f"prefill_{length}", _prefill_samples(m, clock, batch, length, job.repeats))
    if "peak_memory" in metrics:
        emit_metric("peak_memory", [_peak_gib(m, job.device)])


def bench_rank(rank: int, job: Job) -> None:
    """Every plan and batch of the job on this rank, each metric emitted as it is measured."""
    for plan in job.plans:
        free(job.device)
        t0 = time.perf_counter()
        m = build(job, rank, plan)
        sync(job.device)
        if rank == 0:
            weights = job.dtype + (f", {job.quantization.describe()}" if job.quantization else "")
            log(f"[torch-tp] {job.model}: {job.world} {job.device} rank(s), LP {plan.describe()}, {weights}, "
                f"weights ready in {time.perf_counter() - t0:.1f} s")
        clock = _Clock(m, job.device)
        for i, batch in enumerate(job.batches):
            if i:
                free(job.device)
            _bench_config(rank, job, m, clock, batch)
        del m, clock
