# ruff: noqa: B023, E402, E501, E741  (a lab probe kept as it ran: its closures run inside their loop)
"""Probe: does the model's int4 decode materialise dequantized matrices, and why? A 4-layer model at a preset's
widths; per quantization: decode ms/step and the decode programs' fusions whose output has a weight's size."""

import dataclasses
import json
import os
import re
import sys

import jax

from lpjax.engine import Engine
from lpjax.plan import LPPlan
from lpjax.quantize import QuantSpec, int4_storage
from lpjax.sharding import make_mesh
from lpjax.sources.random_weights import RandomSource

name, layers = sys.argv[1], int(sys.argv[2])
group = int(sys.argv[3]) if len(sys.argv) > 3 else None
out = os.environ.get("OUT", "/tmp")
platform = jax.devices()[0].platform
print("int4_storage", platform, int4_storage(platform), flush=True)
dtype = "bfloat16" if platform == "gpu" else "float32"
import jax.numpy as jnp

import lpjax.model as M
from lpjax import quantize as Q

_orig = Q.product
PATCH = os.environ.get("PATCH", "")


def patched(x, w, kernel="xla"):
    """The grouped product in other forms: scales repeated to [K, N] (no reshape), and/or the offsets' term as a
    small product of the inputs' group sums outside the big GEMM."""
    if not Q.is_quantized(w) or (w.scale.shape[0] == 1 and w.offset is None) or not PATCH:
        return _orig(x, w, kernel)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    G = w.scale.shape[0]
    dt = x.dtype
    values = w.values.reshape(K, -1).astype(dt)
    scale = w.scale.reshape(G, -1).astype(dt)
    if "repeat" in PATCH:
        operand = values * jnp.repeat(scale, K // G, axis=0)
    else:
        operand = (values.reshape(G, K // G, -1) * scale[:, None]).reshape(K, -1)
    if w.offset is not None:
        off = w.offset.reshape(G, -1).astype(dt)
        if "offset_out" in PATCH:
            y = x2 @ operand + x2.reshape(-1, G, K // G).sum(-1) @ off
        else:
            y = x2 @ (
                operand
                + (
                    jnp.repeat(off, K // G, axis=0)
                    if "repeat" in PATCH
                    else jnp.broadcast_to(off[:, None], (G, K // G, off.shape[-1])).reshape(K, -1)
                )
            )
    else:
        y = x2 @ operand
    return y.reshape(*lead, *w.shape[1:])


M.product = patched
VARIANTS = [v.split(":") for v in os.environ.get("VARIANTS", "none:xla,int8:xla,int4:xla,int4:pallas").split(",")]
for q, kern in [(None if a == "none" else a, b) for a, b in VARIANTS]:
    src = RandomSource(name)
    src.config = dataclasses.replace(src.config, n_layers=layers)
    eng = Engine(
        src,
        LPPlan.parse("", layers),
        make_mesh(1),
        dtype,
        quantize=QuantSpec.parse(q, group if q == "int4" else None) if q else None,
        quant_kernel=kern,
    )
    prompt = list(range(1, 33))
    eng.generate([prompt], 65, eos=())
    ms = sorted(eng.generate([prompt], 65, eos=()).decode_ms_per_step for _ in range(3))[1]
    big = {}
    for key, exe in eng.programs.compiled.programs.items():
        try:
            text = exe.as_text()
        except Exception:  # noqa: BLE001
            text = ""
        tag = re.sub(r"\W+", "_", str(key))[:80]
        if "decode" in tag and os.environ.get("DUMP"):
            with open(f"{out}/hlo-{q}-{kern}-{PATCH}-{os.environ['DUMP']}.txt", "w") as f:
                f.write(text)
        for m in re.finditer(r"^\s*(\S+) = (\w+)\[([\d,]+)\]\{[^}]*\} fusion\(.*?kind=(\w+), calls=(\S+)", text, re.M):
            n = 1
            for d in m.group(3).split(","):
                n *= int(d)
            if n >= 1 << 20:
                big.setdefault(tag, []).append(f"{m.group(1)} {m.group(2)}[{m.group(3)}] {m.group(4)}")
    print(
        json.dumps(
            dict(
                quantize=q,
                kernel=kern,
                patch=PATCH,
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                layers=layers,
                decode_ms=round(ms, 4),
                big_fusions={k: v[:12] for k, v in big.items()},
            )
        ),
        flush=True,
    )
