"""Why a host-called decode step runs as a chain of programs: the same step three ways, host to host.

    python -m bench.step_latency [--model llama2-7b] [--devices 1] [--lp ''] [--repeats 20] [--decode-tokens 128] \
        [--trace DIR]

Each call feeds back the token ids the last one returned, one cache slot on, runs one decode step with the greedy
choice on the device and brings the next ids back (records.SINGLE_TOKEN's definition). Prints one JSON record of
medians in ms:
- `one_program`: the whole step as one XLA program, its result a fresh device buffer each call;
- `one_program_pinned_out`: the same program writing its result to pinned host memory (GPUs only);
- `engine`: `Engine.next_token`, a chain of programs of the host-called step the engine runs (`host_step.default_span`);
- `chain_4`: the step as a chain of programs of `STEP_SPAN` stages, where the engine runs another span;
- `engine_ids_up`: `Engine.next_token` fed at the same slot every call, so its ids are uploaded each time;
- `loop_per_token`: the on-device decode loop's time per token on the same engine (over --decode-tokens steps), the
  floor a host-called step can approach.
`--trace DIR` also records a JAX profiler trace (host and device timelines) of 5 engine calls, for
`python -m bench.profile`-style reading in TensorBoard or Perfetto. On one H200 (Llama-2-7B, bench/NOTES.md,
2026-11-30) the one program's CUDA graph was re-recorded on every call (its output buffer moved) and the call
returned only after ~2 ms: 6.18 / 5.20 / 4.63 ms for the three.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from bench.common import add_decode_tokens_arg, prompt_ids
from bench.records import DECODE_TOKENS, PROMPT_LEN, SINGLE_TOKEN_AT
from lpjax.engine import Engine
from lpjax.runtime.host_step import STEP_SPAN, HostStep


def timed(calls: int, call) -> list[float]:
    """Host-to-host ms of `calls` calls after 3 warm ones; `call(tokens, i) -> next token ids on the host`."""
    total = []
    tokens = np.full(1, 5, np.int32)
    for i in range(calls + 3):
        t0 = time.perf_counter()
        tokens = call(tokens, i)
        if i >= 3:
            total.append(1000 * (time.perf_counter() - t0))
    return total


def measure(engine: Engine, calls: int, trace: str | None = None, decode_tokens: int = DECODE_TOKENS) -> dict:
    cache = engine.init_cache(1, 2 * SINGLE_TOKEN_AT)
    _, cache, n, pad = engine.prefill(cache, [prompt_ids(SINGLE_TOKEN_AT, engine.config.vocab_size)])
    state = {"cache": cache}
    variants = {"one_program": HostStep(engine.programs, span=None, pinned=False)}
    if engine.programs.on_gpu:
        variants["one_program_pinned_out"] = HostStep(engine.programs, span=None, pinned=True)
    variants["engine"] = engine.step
    if engine.step.span != STEP_SPAN:
        variants[f"chain_{STEP_SPAN}"] = HostStep(engine.programs, span=STEP_SPAN)
    report = {}
    for name, step, advance in [(k, v, True) for k, v in variants.items()] + [("engine_ids_up", engine.step, False)]:
        def call(tokens, i, step=step, advance=advance):
            out, state["cache"] = step.next_token(state["cache"], tokens, n + i * advance, pad)
            return out

        report[name] = statistics.median(timed(calls, call))
    if trace:
        with jax.profiler.trace(trace):
            tokens = np.full(1, 5, np.int32)
            for i in range(5):
                with jax.profiler.TraceAnnotation("next_token"):
                    tokens, state["cache"] = engine.next_token(state["cache"], tokens, n + i, pad)
    prompt = [prompt_ids(PROMPT_LEN, engine.config.vocab_size)]
    engine.generate(prompt, decode_tokens + 1, eos=())  # compile and warm
    report["loop_per_token"] = statistics.median(
        engine.generate(prompt, decode_tokens + 1, eos=()).decode_ms_per_step for _ in range(3))
    return {k: round(v, 4) for k, v in report.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--lp", default="")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each variant (median reported)")
    add_decode_tokens_arg(p)
    p.add_argument("--trace", default=None, help="directory for a JAX profiler trace of 5 engine calls")
    args = p.parse_args()
    engine = Engine.load(f"random:{args.model}", args.lp, args.devices, None)
    print(json.dumps(dict(model=args.model, devices=args.devices, lp=args.lp, jax=jax.__version__,
                          device=engine.mesh.devices.flat[0].device_kind,
                          **measure(engine, args.repeats, args.trace, args.decode_tokens))), flush=True)


if __name__ == "__main__":
    main()
