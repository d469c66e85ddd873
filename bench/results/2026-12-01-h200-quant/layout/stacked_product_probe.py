# ruff: noqa: B023, E402, E501, E741  (a lab probe kept as it ran: its closures run inside their loop)
"""Probe: int4/int8 products with a stack axis (a stage's vmap) as XLA sees them, against the same product on the
2-D matrix, and a custom_vmap that runs a stacked product as one 2-D product per stacked matrix."""

import re

import jax
import jax.numpy as jnp

from bench.quant_gemv import timed
from lpjax.quantize import QuantSpec, dequantize, product, quantize

bf = jnp.bfloat16
f32 = jnp.float32


@jax.custom_batching.custom_vmap
def per_matrix(x, w):
    return product(x, w)


@per_matrix.def_vmap
def _rule(axis_size, in_batched, x, w):
    xb, wb = in_batched[0], jax.tree.leaves(in_batched[1])[0]
    outs = [per_matrix(x[i] if xb else x, jax.tree.map(lambda a: a[i], w) if wb else w) for i in range(axis_size)]
    return jnp.stack(outs), True


def big(text):
    out = []
    for m in re.finditer(
        r"^\s*(\S+) = (\w+)\[([\d,]+)\]\{([^}]*)\} (fusion|transpose|copy)\(.*?(?:kind=(\w+))?", text, re.M
    ):
        n = 1
        for d in m.group(3).split(","):
            n *= int(d)
        if n >= 1 << 22:
            out.append(f"{m.group(2)}[{m.group(3)}] {m.group(6) or m.group(5)}")
    return out


gpu = jax.default_backend() == "gpu"
SHAPES = {"wqkv": (4096, 12288), "down": (11008, 4096)} if gpu else {"small": (256, 384)}
nw = 16 if gpu else 2
for qname in ("int4", "int8"):
    spec = QuantSpec.parse(qname, 64 if not gpu and qname == "int4" else None)
    for shape, (K, N) in SHAPES.items():
        x = jax.random.normal(jax.random.PRNGKey(0), (8, K), f32).astype(bf)
        for stack in (1, 2):
            ws = [
                jax.vmap(lambda a: quantize(a, spec, bf))(
                    jax.random.normal(jax.random.PRNGKey(i + 1), (stack, K, N), f32) * 0.02
                )
                for i in range(nw)
            ]
            want = sum(x.astype(f32) @ dequantize(jax.tree.map(lambda a: a[s], ws[0]), f32) for s in range(stack))
            variants = {
                "vmap (now)": lambda x, w: jax.vmap(product, in_axes=(None, 0))(x, w).sum(0),
                "custom_vmap per matrix": lambda x, w: jax.vmap(per_matrix, in_axes=(None, 0))(x, w).sum(0),
            }
            if stack == 1:
                variants["2-D, no stack"] = lambda x, w: product(x, jax.tree.map(lambda a: a[0], w))
            for label, f in variants.items():
                try:
                    got = jax.jit(f)(x, ws[0]).astype(f32)
                    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                    text = jax.jit(f).lower(x, ws[0]).compile().as_text()
                    t = timed(f, x, ws, 4, 5)[0] * 1e6 if gpu else 0.0
                    print(
                        f"{qname:5} {shape:5} stack {stack} {label:24} {t:7.1f} us  err {err:.1e}  {big(text)}",
                        flush=True,
                    )
                except Exception as e:  # noqa: BLE001
                    print(f"{qname:5} {shape:5} stack {stack} {label:24} ERROR {str(e).splitlines()[0][:200]}")
