# ruff: noqa: B023, E402, E501, E741  (a lab probe kept as it ran: its closures run inside their loop)
"""Probe (compile only): which forms of the model's int4 product make XLA materialise the dequantized matrix?"""

import re

import jax
import jax.numpy as jnp

from lpjax.model import normed_project, project
from lpjax.quantize import QuantSpec, quantize

bf = jnp.bfloat16
K = 4096


def big(text):
    out = []
    for m in re.finditer(
        r"^\s*(\S+) = (\w+)\[([\d,]+)\]\{([^}]*)\} (fusion|transpose|copy)\(.*?(?:kind=(\w+))?", text, re.M
    ):
        n = 1
        for d in m.group(3).split(","):
            n *= int(d)
        if n >= 1 << 22:
            out.append(f"{m.group(1)} {m.group(2)}[{m.group(3)}]{{{m.group(4)}}} {m.group(6) or m.group(5)}")
    return out


def make(shape, spec):
    w = jax.random.normal(jax.random.PRNGKey(1), (1, *shape), jnp.float32) * 0.02
    return jax.vmap(lambda a: quantize(a, spec, bf))(w)


for qname in ("int4", "int8"):
    spec = QuantSpec.parse(qname)
    for wname, shape in (("wo", (K, K)), ("wqkv4d", (K, 32, 3, 128)), ("wqkv2d", (K, 12288))):
        qw = make(shape, spec)
        x = jnp.ones((8, 1, K), bf)
        norm = jnp.ones((1, K), bf)

        def stage(x, qw):  # as the model: vmapped over the stack of 1
            return jax.vmap(lambda n, w: normed_project(x, n, w, 1e-5), in_axes=(0, 0))(norm, qw).sum(0)

        def plain(x, qw):
            return jax.vmap(lambda w: project(x, w), in_axes=0)(qw).sum(0)

        def loop(f):
            def run(x, qw):
                def body(i, x):
                    y = f(x, qw)
                    return x + y.reshape(8, 1, -1)[..., :K].astype(x.dtype) * 1e-3

                return jax.lax.fori_loop(0, 4, body, x)

            return run

        for label, f in (
            ("plain", plain),
            ("stage", stage),
            ("plain in loop", loop(plain)),
            ("stage in loop", loop(stage)),
        ):
            try:
                text = jax.jit(f).lower(x, qw).compile().as_text()
                print(f"{qname:5} {wname:7} {label:14} {big(text)}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{qname:5} {wname:7} {label:14} ERROR {str(e).splitlines()[0][:200]}")
