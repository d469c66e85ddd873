"""Where decode time goes: trace one on-device decode loop with the JAX profiler and summarise the GPU kernels.

    python -m bench.profile --model llama2-7b --lp 16:30 --devices 2 [--tokens 128] [--summary FILE] [--quantize int8]

Prints, per device: wall time per token, kernel time per token (the rest is gaps between kernels), kernels per
token, the kernels that take the most time, and the decode step's budget per stage (kernels and microseconds by
class: GEMM, all-reduce, cache write, pad, other fusions, gaps). The raw trace stays in a temp dir for TensorBoard /
xprof.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
import time

import jax

from bench import common
from bench.records import PROMPT_LEN
from lpjax.cli import add_quantize_args, quantize_spec
from lpjax.engine import Engine
from lpjax.weights import DTYPES


def kernel_events(path: str) -> dict[str, list[tuple[str, int, int]]]:
    """(name, start_ns, duration_ns) of device kernels, per GPU plane, from an .xplane.pb trace."""
    from jax.profiler import ProfileData

    out = {}
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        events = []
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            events += [(ev.name, int(ev.start_ns), int(ev.duration_ns)) for ev in line.events]
        out[plane.name] = sorted(events, key=lambda e: e[1])
    return out


KERNEL_CLASSES = (  # (class, pattern on XLA's kernel names), first match wins
    ("gemm", r"gemm|cublas|xmma|cutlass|gemv"),
    ("all-reduce", r"psum|all-reduce|all_reduce|allreduce|nccl"),
    ("all-gather", r"all-gather|all_gather|allgather"),
    ("cache write", r"dynamic_update_slice"),
    ("pad", r"pad_fusion|^pad"),
)


def kernel_class(name: str) -> str:
    """The budget class of a kernel by its name; the rest (norms, residual adds, RoPE, softmax, the attention
    products, slices) are XLA fusions with generic names: "other fusion"."""
    return next((cls for cls, pattern in KERNEL_CLASSES if re.search(pattern, name)), "other fusion")


def budget(events: list[tuple[str, int, int]], tokens: int, stages: int) -> dict:
    """Kernels and microseconds per stage (a layer or an LP pair) by class, and the gaps between kernels."""
    rows = collections.defaultdict(lambda: [0, 0])
    for name, _, d in events:
        rows[kernel_class(name)][0] += 1
        rows[kernel_class(name)][1] += d
    span = (events[-1][1] + events[-1][2] - events[0][1]) if events else 0
    per = tokens * stages
    out = {cls: {"kernels": round(n / per, 2), "us": round(ns / per / 1e3, 2)} for cls, (n, ns) in sorted(rows.items())}
    out["gaps"] = {"kernels": 0, "us": round((span - sum(d for _, _, d in events)) / per / 1e3, 2)}
    return out


def summarise(events: list[tuple[str, int, int]], tokens: int, top: int) -> dict:
    span = (events[-1][1] + events[-1][2] - events[0][1]) if events else 0
    busy = sum(d for _, _, d in events)
    by_name = collections.defaultdict(lambda: [0, 0])
    for name, _, d in events:
        key = re.sub(r"\.\d+$", "", name)[:90]
        by_name[key][0] += d
        by_name[key][1] += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    per_token = round(len(events) / tokens) if tokens else 0
    middle = events[(tokens // 2) * per_token: (tokens // 2 + 1) * per_token]
    sequence = [(n, round(d / 1e3, 2), round((s - (middle[i - 1][1] + middle[i - 1][2])) / 1e3, 2) if i else 0.0)
                for i, (n, s, d) in enumerate(middle)]
    return {
        "sequence_one_token": sequence,  # (kernel, duration us, gap before us), one token from the middle
        "span_ms_per_token": span / tokens / 1e6, "kernel_ms_per_token": busy / tokens / 1e6,
        "kernels_per_token": len(events) / tokens,
        "top": [{"kernel": k, "ms_per_token": v[0] / tokens / 1e6, "calls_per_token": v[1] / tokens}
                for k, v in ranked],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b", help="a preset (random weights) or any model lpjax loads")
    p.add_argument("--lp", default="", metavar="START:END", help="the plan (default: sequential)")
    p.add_argument("--devices", type=int, default=None, help="devices to use (default: all visible)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--tokens", type=int, default=128, help="decode steps traced")
    p.add_argument("--top", type=int, default=25, help="kernels listed, the slowest first")
    p.add_argument("--summary", default=None, help="write the summary JSON here (the trace stays in a temp dir)")
    add_quantize_args(p)
    args = p.parse_args(argv)
    engine = Engine.load(common.engine_model(args.model), args.lp, args.devices, args.dtype,
                         quantize=quantize_spec(args), quant_kernel=args.quant_kernel)
    prompt = common.model_prompt(PROMPT_LEN, engine.config)
    engine.generate([prompt], args.tokens + 1, eos=())  # compile and warm up
    out = tempfile.mkdtemp(prefix="lpjax-trace-")
    jax.profiler.start_trace(out)
    t0 = time.perf_counter()
    res = engine.generate([prompt], args.tokens + 1, eos=())
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    trace = glob.glob(f"{out}/**/*.xplane.pb", recursive=True)[0]
    report = {"model": args.model, "lp": engine.plan.spec(), "devices": engine.layout.n_devices,
              "quantize": engine.quantization,
              "decode_ms_per_token": res.decode_ms_per_step, "wall_s": wall, "jax": jax.__version__,
              "devices_report": {k: summarise(v, args.tokens, args.top) | {"budget_per_stage": budget(
                  v, args.tokens, len(engine.layout.stages))} for k, v in kernel_events(trace).items()}}
    print(f"{engine.describe()}\ndecode {res.decode_ms_per_step:.3f} ms/token (traced run)")
    for dev, s in report["devices_report"].items():
        print(f"{dev}: span {s['span_ms_per_token']:.3f} ms/token, kernels {s['kernel_ms_per_token']:.3f} ms/token, "
              f"{s['kernels_per_token']:.0f} kernels/token")
        for row in s["top"]:
            print(f"   {row['ms_per_token'] * 1000:8.1f} us/token  x{row['calls_per_token']:5.1f}  {row['kernel']}")
        print(f"budget per stage ({len(engine.layout.stages)} stages; the embedding and LM head spread over them):")
        for cls, row in s["budget_per_stage"].items():
            print(f"   {cls:14s} {row['kernels']:6.2f} kernels {row['us']:8.2f} us")
        break  # one device is representative; all are in the JSON
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(report, f, indent=1)
    print(f"trace in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(common.exit_code(main))
