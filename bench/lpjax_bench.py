"""lpjax's benchmark runner: one model on N devices, for several LP Δ, at one batch size (run by `bench.run`).

    python -m bench.lpjax_bench --model llama2-7b --gpus 2 --lp-delta 0,14 --batch 1 --json-out FILE

Random weights at the preset's real shapes (bf16 on GPU, float32 on CPU). Every metric is timed after a warm-up of
the same compiled program; compile time is never inside a figure (the engine measures it apart). One process per
(model, GPUs, batch) keeps JAX and PyTorch off each other's memory and gives each configuration its own peak.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bench.records import DECODE_TOKENS, METRICS, PROMPT_LEN, SINGLE_TOKEN_AT, append, make, parse_list, prompt_ids
from lpjax.cli import enable_compile_cache
from lpjax.config import PRESETS
from lpjax.engine import Engine
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan

IMPL = "lpjax"
SINGLE_TOKEN_CALLS = 20


def _prompts(batch: int, n: int, vocab: int) -> list[list[int]]:
    return [prompt_ids(n, vocab, row) for row in range(batch)]


def time_decode(engine: Engine, batch: int, repeats: int) -> list[float]:
    prompts = _prompts(batch, PROMPT_LEN, engine.config.vocab_size)
    engine.generate(prompts, DECODE_TOKENS + 1, eos=())  # compile + warm-up (the first token comes from prefill)
    return [engine.generate(prompts, DECODE_TOKENS + 1, eos=()).decode_ms_per_step for _ in range(repeats)]


def time_prefill(engine: Engine, batch: int, n: int, repeats: int) -> list[float]:
    prompts = _prompts(batch, n, engine.config.vocab_size)
    run = lambda: engine.generate(prompts, 1, eos=(), max_len=n + 128).prefill_s * 1000  # noqa: E731
    run()
    return [run() for _ in range(repeats)]


def time_generate(engine: Engine, batch: int, tokens: int, repeats: int) -> list[float]:
    """Wall seconds for `tokens` new tokens (prefill included). The engine compiles and warms the loop with one
    step before its timed run, so every call, the first included, is a warm figure."""
    prompts = _prompts(batch, PROMPT_LEN, engine.config.vocab_size)
    out = []
    for _ in range(repeats):
        r = engine.generate(prompts, tokens, eos=(), max_len=PROMPT_LEN + tokens)
        out.append(r.prefill_s + r.decode_s)
    return out


def time_single_token(engine: Engine, batch: int, calls: int) -> list[float]:
    """records.SINGLE_TOKEN: `Engine.next_token` after a prompt of SINGLE_TOKEN_AT tokens, each call feeding the
    token the previous one returned (host -> device -> host), at the same cache slot; host clock around the call."""
    prompts = _prompts(batch, SINGLE_TOKEN_AT, engine.config.vocab_size)
    cache = engine.init_cache(batch, engine.cache_length(SINGLE_TOKEN_AT, DECODE_TOKENS, None))  # 384, as torch
    _, cache, n, pad = engine.prefill(cache, prompts)
    tokens = np.full(batch, 5, np.int32)
    out = []
    for i in range(calls + 2):  # the first two compile and warm
        t = time.perf_counter()
        tokens, cache = engine.next_token(cache, tokens, n, pad)
        if i >= 2:
            out.append((time.perf_counter() - t) * 1000)
    return out


def peak_memory_gib(engine: Engine) -> list[float] | None:
    stats = [d.memory_stats() for d in engine.mesh.devices.flat]
    if any(not s or "peak_bytes_in_use" not in s for s in stats):
        return None  # CPU devices report no allocator statistics
    return [max(s["peak_bytes_in_use"] for s in stats) / 2**30]


def measure(engine: Engine, batch: int, metrics: list[str], repeats: int, long_repeats: int) -> dict[str, list]:
    out: dict[str, list] = {}
    for m in metrics:
        print(f"[lpjax] {engine.plan.spec() or 'sequential'} batch {batch}: {m}", file=sys.stderr, flush=True)
        if m == "decode":
            out[m] = time_decode(engine, batch, repeats)
        elif m.startswith("prefill_"):
            out[m] = time_prefill(engine, batch, int(m.split("_")[1]), repeats)
        elif m.startswith("generate_"):
            out[m] = time_generate(engine, batch, int(m.split("_")[1]), long_repeats)
        elif m == "single_token":
            out[m] = time_single_token(engine, batch, SINGLE_TOKEN_CALLS)
    if "peak_memory" in metrics and (peak := peak_memory_gib(engine)):
        out["peak_memory"] = peak  # since the process started: every configuration of this process so far
    return out


def versions(engine: Engine) -> dict:
    import flax
    import jaxlib

    d = engine.mesh.devices.flat[0]
    return dict(versions={"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__},
                device_name=getattr(d, "device_kind", d.platform), dtype=engine.dtype_name,
                attention=engine.attention)


def run(model: str, gpus: int, deltas: list[int], batch: int, metrics: list[str], repeats: int, long_repeats: int,
        json_out: Path | None, impl: str = IMPL) -> None:
    if model not in PRESETS:
        raise LPJaxError(f"--model {model}: not a preset ({', '.join(PRESETS)})")
    n_layers = PRESETS[model].n_layers
    for delta in deltas:
        plan = LPPlan.ending_before_last(delta, n_layers)
        engine = Engine.load(f"random:{model}", plan.spec(), gpus, None)
        print(f"[lpjax] {engine.describe()}", file=sys.stderr, flush=True)
        figures = measure(engine, batch, metrics, repeats, long_repeats)
        context = versions(engine)
        append(json_out, [make(impl, model, gpus, delta, plan.spec(), batch, m, v, **context)
                          for m, v in figures.items()])
        del engine
        gc.collect()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--gpus", type=int, default=1, help="devices to use (the first N)")
    p.add_argument("--lp-delta", default="0", help="comma-separated Δ (0 = sequential)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--metrics", default="prefill_1024,prefill_4096,decode,single_token,peak_memory",
                   help=f"comma-separated, of: {', '.join(METRICS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--long-repeats", type=int, default=1, help="repeats of generate_4096 (16+ s each on a 7B model)")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--impl-name", default=IMPL, help="name in the records (variants: e.g. lpjax+flags)")
    args = p.parse_args(argv)
    metrics = parse_list(args.metrics)
    unknown = [m for m in metrics if m not in METRICS]
    try:
        if unknown:
            raise LPJaxError(f"--metrics: unknown {', '.join(unknown)} (choose from {', '.join(METRICS)})")
        if len(jax.devices()) < args.gpus:
            raise LPJaxError(f"--gpus {args.gpus}: only {len(jax.devices())} devices visible")
        enable_compile_cache()
        run(args.model, args.gpus, parse_list(args.lp_delta, int), args.batch, metrics, args.repeats,
            args.long_repeats, args.json_out, args.impl_name)
    except LPJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
