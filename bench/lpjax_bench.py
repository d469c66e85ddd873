"""lpjax's benchmark runner: one model on N devices, for several LP Δ and batch sizes (run by `bench.run`).

    python -m bench.lpjax_bench --model llama2-7b --devices 2 --delta 0,14 --batch 1 --json-out FILE
    python -m bench.lpjax_bench --model llama2-7b --devices 1 --delta 0,14 --quantize int8 --json-out FILE

Random weights at the preset's real shapes (bf16 on GPU, float32 on CPU unless --dtype says otherwise); with
`--quantize int8|int4 [--group-size G]` the matrices are quantized as they load (records named `lpjax-int8`,
`lpjax-int4`, or `lpjax-int4-g64` for a group size other than the default, unless --impl-name says otherwise).
Every metric is timed after a warm-up of the same compiled program; compile time is never inside a figure (the
engine measures it apart). One process per (model, devices, batch) keeps JAX and PyTorch off each other's memory
and gives each configuration its own peak.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import jax
import numpy as np

from bench import common
from bench.common import log, model_prompt
from bench.records import DECODE_TOKENS, PROMPT_LEN, SINGLE_TOKEN_AT, make
from lpjax.cli import add_quantize_args, enable_compile_cache, quantize_spec
from lpjax.config import PRESETS
from lpjax.engine import Engine
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan
from lpjax.quantize import QuantSpec

IMPL = "lpjax"
SINGLE_TOKEN_CALLS = 20


def _prompts(engine: Engine, batch: int, n: int) -> list[list[int]]:
    return [model_prompt(n, engine.config)] * batch


def time_decode(engine: Engine, batch: int, repeats: int, tokens: int = DECODE_TOKENS) -> list[float]:
    prompts = _prompts(engine, batch, PROMPT_LEN)
    engine.generate(prompts, tokens + 1, eos=())  # compile + warm-up (the first token comes from prefill)
    return [engine.generate(prompts, tokens + 1, eos=()).decode_ms_per_step for _ in range(repeats)]


def time_prefill(engine: Engine, batch: int, n: int, repeats: int) -> list[float]:
    prompts = _prompts(engine, batch, n)
    run = lambda: engine.generate(prompts, 1, eos=(), max_len=n + 128).prefill_s * 1000  # noqa: E731
    run()
    return [run() for _ in range(repeats)]


def time_generate(engine: Engine, batch: int, tokens: int, repeats: int) -> list[float]:
    """Wall seconds for `tokens` new tokens (prefill included). The engine compiles and warms the loop with one
    step before its timed run, so every call, the first included, is a warm figure."""
    prompts = _prompts(engine, batch, PROMPT_LEN)
    out = []
    for _ in range(repeats):
        r = engine.generate(prompts, tokens, eos=(), max_len=PROMPT_LEN + tokens)
        out.append(r.prefill_s + r.decode_s)
    return out


def time_single_token(engine: Engine, batch: int, calls: int) -> list[float]:
    """records.SINGLE_TOKEN: `Engine.next_token` after a prompt of SINGLE_TOKEN_AT tokens, each call feeding back
    the token ids the previous one returned, one cache slot on (as torch's graph advances its position); host
    clock around the call."""
    prompts = _prompts(engine, batch, SINGLE_TOKEN_AT)
    cache = engine.init_cache(batch, engine.cache_length(SINGLE_TOKEN_AT, DECODE_TOKENS, None))  # 384, as torch
    _, cache, n, pad = engine.prefill(cache, prompts)
    tokens = np.full(batch, 5, np.int32)
    out = []
    for i in range(calls + 2):  # the first two compile and warm
        t = time.perf_counter()
        tokens, cache = engine.next_token(cache, tokens, n + i, pad)
        if i >= 2:
            out.append((time.perf_counter() - t) * 1000)
    return out


def peak_memory_gib(engine: Engine) -> list[float] | None:
    stats = [d.memory_stats() for d in engine.mesh.devices.flat]
    if any(not s or "peak_bytes_in_use" not in s for s in stats):
        return None  # CPU devices report no allocator statistics
    return [max(s["peak_bytes_in_use"] for s in stats) / 2**30]


def measure(engine: Engine, batch: int, metrics: list[str], repeats: int, long_repeats: int,
            decode_tokens: int = DECODE_TOKENS) -> dict[str, list]:
    out: dict[str, list] = {}
    for m in metrics:
        log(f"[lpjax] {engine.plan.spec() or 'sequential'} batch {batch}: {m}")
        if m == "decode":
            out[m] = time_decode(engine, batch, repeats, decode_tokens)
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
                attention=engine.attention, quantize=engine.quantization,
                weight_gb=round(engine.weight_bytes / 1e9, 3))


def impl_name(quantize: QuantSpec | None) -> str:
    """The records' name of lpjax under `quantize`: `lpjax`, `lpjax-int8`, `lpjax-int4` (default group) or
    `lpjax-int4-g64`."""
    if quantize is None:
        return IMPL
    default = QuantSpec.parse(quantize.kind).group_size
    return f"{IMPL}-{quantize.kind}" + ("" if quantize.group_size == default else f"-g{quantize.group_size}")


def run(model: str, devices: int, plans: list[LPPlan], batches: list[int], metrics: list[str], repeats: int,
        long_repeats: int, json_out: str | None, dtype: str | None = None, impl: str | None = None,
        quantize: QuantSpec | None = None, quant_kernel: str = "xla", decode_tokens: int = DECODE_TOKENS) -> None:
    """Every plan on `devices` devices, each at every batch size; records emitted per plan."""
    impl = impl or impl_name(quantize)
    for plan in plans:
        engine = Engine.load(f"random:{model}", plan.spec(), devices, dtype, quantize=quantize,
                             quant_kernel=quant_kernel)
        log(f"[lpjax] {engine.describe()}")
        for batch in batches:
            figures = measure(engine, batch, metrics, repeats, long_repeats, decode_tokens)
            context = versions(engine)
            for m, v in figures.items():
                extra = {"decode_tokens": decode_tokens} if m == "decode" else {}
                common.emit(make(impl, model, devices, plan.delta, plan.spec(), batch, m, v, **context, **extra),
                            json_out)
        del engine
        gc.collect()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_runner_args(p, "devices to use (the first N)")
    p.add_argument("--impl-name", default=None,
                   help="name in the records (default lpjax, or lpjax-int8 ... under --quantize; variants: e.g. "
                        "lpjax+flags)")
    add_quantize_args(p)
    args = p.parse_args(argv)
    quantize = quantize_spec(args)
    if quantize is not None and quantize.kind == "gguf":
        raise LPJaxError("--quantize gguf: the benchmark runs random weights; use int8 or int4")
    name = args.model.removeprefix("random:")
    if name not in PRESETS:
        raise LPJaxError(f"--model {args.model}: not a preset ({', '.join(PRESETS)})")
    metrics = common.parse_metrics(args.metrics)
    common.check_counts(args)
    common.check_json_out(args.json_out)
    plans = common.runner_plans(args, PRESETS[name])
    batches = common.parse_ints(args.batch, "--batch", 1)
    if len(jax.devices()) < args.devices:
        raise LPJaxError(f"--devices {args.devices}: only {len(jax.devices())} devices visible")
    enable_compile_cache()
    run(name, args.devices, plans, batches, metrics, args.repeats, args.long_repeats, args.json_out, args.dtype,
        args.impl_name, quantize, args.quant_kernel, args.decode_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(common.exit_code(main))
