"""Micro-benchmark: the Pallas decode-attention kernel against lpjax's XLA decode attention, one layer's worth.

    python -m bench.decode_kernel [--models llama2-7b,smollm2-135m] [--lengths 256,1024,4096] [--batch 1,8]
        [--blocks 32,64] [--splits auto,1,4,16] [--warps 4] [--fill 1.0] [--repeats 50] [--dtype bfloat16]
        [--out decode_kernel.json]

The XLA path is the model's decode attention as `lpjax/model.py` writes it (the norm's row factor on the qkv
product, RoPE, the two cache writes, scores and softmax, probs @ V, the residual stream's padding rows); the kernel
is `lpjax/kernels/decode_attention.py`, once per block size × splits × warps (the default: block 64, automatic
splits, 4 warps). Both take the qkv product of the model's stream rows (8 at batch 1) and a donated cache of
`length` slots at a model preset's attention shape (per GPU, no tensor parallelism), the new token at slot
`fill`·(length-1). Each is first checked against the XLA path (the largest differences of the output and of the
caches), then timed: the device time of a call (its kernels' durations summed, from a JAX profiler trace) and its
span (first kernel's start to last kernel's end), medians over `repeats` calls, and its kernels a call. Off GPUs,
host wall time stands in (a smoke run: the kernel runs in interpret mode there). Prints a table; writes every
figure to --out (JSON) and a plot beside it (PNG).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.profile import kernel_events
from lpjax.cache import StageCache
from lpjax.config import preset
from lpjax.kernels.decode_attention import BLOCK, decode_attention, default_splits
from lpjax.model import Positions, _cached_attention, _write_cache, apply_rope, rope_inv_freq, stream_rows


def xla_attention(config):
    """`AttentionBlock`'s decode step from the qkv product to the attention output, as the model compiles it."""
    inv_freq = rope_inv_freq(config)

    def run(y, scale, k_cache, v_cache, index, pad):
        B, rows, (K, G2, hd) = pad.shape[0], y.shape[0], y.shape[1:]
        G = G2 - 2
        qkv = (y[:, None] * scale[:, None, None, None, None]).astype(y.dtype)[:B]  # `normed_project`'s factor
        q = qkv[:, :, :, :G].reshape(B, 1, K * G, hd)
        k, v = qkv[:, :, :, G], qkv[:, :, :, G + 1]
        pos = Positions.step(pad, index)
        q, k = apply_rope(q, pos.positions, inv_freq), apply_rope(k, pos.positions, inv_freq)
        cache = _write_cache(StageCache(k_cache, v_cache), k, v, pos.index)
        out = _cached_attention(q, cache.k, cache.v, pos).reshape(B, K * G, hd)
        return jnp.pad(out, ((0, rows - B), (0, 0), (0, 0))), cache.k, cache.v

    return jax.jit(run, donate_argnums=(2, 3))


def kernel_attention(config, block: int, splits: int | None, warps: int):
    inv_freq = rope_inv_freq(config)

    def run(y, scale, k_cache, v_cache, index, pad):
        return decode_attention(y, scale, None, k_cache, v_cache, index, pad, inv_freq, block=block, splits=splits,
                                out_rows=y.shape[0], num_warps=warps)

    return jax.jit(run, donate_argnums=(2, 3))


def make_inputs(config, batch: int, length: int, fill: float, dtype, seed: int = 0):
    """The qkv product of the stream's rows, the row factors, a random full cache, the slot, no left padding."""
    K, hd = config.n_kv_heads, config.head_dim
    G, rows = config.n_heads // K, stream_rows(batch, 1)
    keys = jax.random.split(jax.random.key(seed), 4)
    y = jax.random.normal(keys[0], (rows, K, G + 2, hd), dtype)
    scale = jax.random.uniform(keys[1], (rows,), jnp.float32, 0.5, 2.0)
    k_cache = jax.random.normal(keys[2], (batch, K, length, hd), dtype)
    v_cache = jax.random.normal(keys[3], (batch, K, length, hd), dtype)
    index = jnp.int32(round(fill * (length - 1)))  # one slot for every row, as the on-device decode loop has it
    return y, scale, k_cache, v_cache, index, jnp.zeros(batch, jnp.int32)


def copies(args):
    return tuple(jnp.copy(a) for a in args)


def time_calls(fn, args, repeats: int, on_gpu: bool) -> dict:
    """Median device time and span of a call (us) and its kernels, from a profiler trace of `repeats` calls; the
    cache each call returns is the next call's (it is donated). Off GPUs: median host wall time."""
    y, scale, k_cache, v_cache, index, pad = copies(args)
    for _ in range(3):
        _, k_cache, v_cache = fn(y, scale, k_cache, v_cache, index, pad)
    jax.block_until_ready(k_cache)
    if not on_gpu:
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, k_cache, v_cache = jax.block_until_ready(fn(y, scale, k_cache, v_cache, index, pad))
            walls.append(1e6 * (time.perf_counter() - t0))
        return {"device_us": statistics.median(walls), "span_us": statistics.median(walls), "kernels": None}
    with tempfile.TemporaryDirectory(prefix="lpjax-decode-kernel-") as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(repeats):
            _, k_cache, v_cache = fn(y, scale, k_cache, v_cache, index, pad)
        jax.block_until_ready(k_cache)
        jax.profiler.stop_trace()
        [path] = Path(trace_dir).rglob("*.xplane.pb")
        events = next(iter(kernel_events(str(path)).values()))
    per_call, left = divmod(len(events), repeats)
    if left:
        raise RuntimeError(f"{len(events)} kernels in {repeats} calls: not the same kernels every call")
    calls = [events[i * per_call:(i + 1) * per_call] for i in range(repeats)]
    device = [sum(d for _, _, d in c) / 1e3 for c in calls]
    span = [(c[-1][1] + c[-1][2] - c[0][1]) / 1e3 for c in calls]
    return {"device_us": statistics.median(device), "span_us": statistics.median(span), "kernels": per_call,
            "kernel_names": sorted({n for n, _, _ in calls[0]})}


def check(fn, reference_out, reference_k, reference_v, args) -> dict:
    """The variant's output and caches against the XLA path's: largest absolute differences (the caches differ by
    a rounding where one compiler contracts RoPE's multiply-adds into FMAs and the other does not)."""
    out, k_cache, v_cache = fn(*copies(args))

    def diff(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    return {"max_abs_diff": diff(out, reference_out),
            "cache_max_diff": max(diff(k_cache, reference_k), diff(v_cache, reference_v))}


def plot(records: list[dict], path: Path) -> None:
    """Device µs a call against the cache length: the XLA path, the kernel's default and its best variant; one
    panel per model and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["batch"]) for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels):
        rows = [r for r in records if r["model"] == model and r["batch"] == batch]
        lengths = sorted({r["length"] for r in rows})
        lines = {"XLA path": lambda rs: [r for r in rs if r["variant"] == "xla"],
                 "Pallas, default": lambda rs: [r for r in rs if r.get("default")],
                 "Pallas, best": lambda rs: sorted((r for r in rs if r["variant"] != "xla"),
                                                   key=lambda r: r["device_us"])[:1]}
        for label, pick in lines.items():
            picked = [pick([r for r in rows if r["length"] == n]) for n in lengths]
            if all(picked):
                ax.plot(lengths, [p[0]["device_us"] for p in picked], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("cache slots")
        ax.set_ylabel("device µs a layer")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama2-7b,smollm2-135m", help="presets whose attention shape to time")
    p.add_argument("--lengths", default="256,1024,4096", help="cache slots")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--blocks", default="32,64", help="kernel block sizes (slots a step)")
    p.add_argument("--splits", default="auto,1,4,16", help="kernel splits per (row, KV head); auto: the default")
    p.add_argument("--warps", default="4", help="kernel warps a program")
    p.add_argument("--fill", type=float, default=1.0, help="the new token's slot as a fraction of the cache")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--dtype", default="bfloat16", help="the model's (float32 for a smoke run on CPUs)")
    p.add_argument("--out", default="decode_kernel.json", help="JSON records (a PNG plot is written beside it)")
    args = p.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0].device_kind
    print(f"{device}, jax {jax.__version__}; {'device time from a profiler trace' if on_gpu else 'host wall time'}")
    records = []
    header = (f"{'model':14s} {'B':>2s} {'slots':>5s} | {'XLA us':>7s} {'span':>6s} {'kern':>4s} | "
              f"{'Pallas us':>9s} {'span':>6s} {'kern':>4s} {'(default)':>12s} | {'best us':>7s} {'variant':>14s} | "
              f"{'speed-up':>8s} | {'max diff':>8s} cache diff")
    print(header)
    for model in args.models.split(","):
        config = preset(model)
        for batch in (int(b) for b in args.batch.split(",")):
            for length in (int(n) for n in args.lengths.split(",")):
                inputs = make_inputs(config, batch, length, args.fill, jnp.dtype(args.dtype))
                base = dict(model=model, batch=batch, length=length, fill=args.fill, dtype=args.dtype,
                            kv_heads=config.n_kv_heads, heads=config.n_heads, head_dim=config.head_dim,
                            device=device, jax=jax.__version__)
                xla = xla_attention(config)
                ref_out, ref_k, ref_v = xla(*copies(inputs))
                row = [dict(base, variant="xla", **time_calls(xla, inputs, args.repeats, on_gpu))]
                variants = [(int(b), s, int(w)) for b in args.blocks.split(",") for s in args.splits.split(",")
                            for w in args.warps.split(",")]
                for block, s, warps in variants:
                    splits = default_splits(batch, config.n_kv_heads, length, block) if s == "auto" else int(s)
                    if any((r.get("block"), r.get("splits"), r.get("warps")) == (block, splits, warps) for r in row):
                        continue  # auto is one of the listed splits
                    fn = kernel_attention(config, block, splits, warps)
                    row.append(dict(base, variant=f"b{block}/s{splits}/w{warps}", block=block, splits=splits,
                                    warps=warps, default=block == BLOCK and s == "auto" and warps == 4,
                                    **check(fn, ref_out, ref_k, ref_v, inputs),
                                    **time_calls(fn, inputs, args.repeats, on_gpu)))
                records += row
                x = row[0]
                kernels = [r for r in row if r["variant"] != "xla"]
                best = min(kernels, key=lambda r: r["device_us"])
                d = next((r for r in kernels if r.get("default")), best)
                worst = max(r["max_abs_diff"] for r in kernels)
                cache = max(r["cache_max_diff"] for r in kernels)
                print(f"{model:14s} {batch:2d} {length:5d} | {x['device_us']:7.2f} {x['span_us']:6.2f} "
                      f"{x['kernels'] or '-':>4} | {d['device_us']:9.2f} {d['span_us']:6.2f} {d['kernels'] or '-':>4} "
                      f"{d['variant']:>12s} | {best['device_us']:7.2f} {best['variant']:>14s} | "
                      f"{x['device_us'] / best['device_us']:7.2f}x | {worst:8.4f} "
                      f"{'equal' if cache == 0 else f'{cache:.2g}'}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    try:
        plot(records, out.with_suffix(".png"))
    except ImportError:
        print("(no matplotlib: no plot)")
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if out.with_suffix(".png").exists() else ""))


if __name__ == "__main__":
    main()
