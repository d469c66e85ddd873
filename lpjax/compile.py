"""One way to compile a program, for the engine and for training: ahead of time, cached by key, its seconds counted
(timings exclude compilation), and one rule for the attention kernel."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lpjax.errors import LPJaxError, first_line

PALLAS = "pallas+"  # a resolved `pallas`: the Pallas decode kernel for decode steps, the suffix for the rest


ATTENTIONS = ("auto", "xla", "cudnn", "pallas")  # what a tool's --attention asks for (`resolve_attention`)


def resolve_attention(requested: str, platform: str, dtype: str) -> str:
    """`auto` is cuDNN's fused attention on GPUs in 16-bit dtypes and XLA's everywhere else. `pallas` is the Pallas
    decode-attention kernel (`lpjax/kernels/decode_attention.py`) for decode steps and auto's choice for prefill:
    `pallas+cudnn` or `pallas+xla`."""
    if requested == "pallas":
        return PALLAS + resolve_attention("auto", platform, dtype)
    if requested != "auto":
        return requested
    return "cudnn" if platform == "gpu" and dtype in ("bfloat16", "float16") else "xla"


class CompileCache:
    """Compiled executables by key, and the seconds spent compiling them."""

    def __init__(self):
        self.programs: dict = {}
        self.seconds = 0.0

    def get(self, key, build: Callable[[], Any], args: tuple, options: dict | None = None):
        """`build()` (a jitted function) lowered and compiled for `args`, once per key."""
        if key not in self.programs:
            t0 = time.perf_counter()
            self.programs[key] = build().lower(*args).compile(compiler_options=options or None)
            self.seconds += time.perf_counter() - t0
        return self.programs[key]

    def get_attention(self, key, build: Callable[[str], Any], args: tuple, attention: str, automatic: bool,
                      options: dict | None = None, note: Callable[[str], None] | None = None):
        """`build(attention)` compiled for `args`. cuDNN attention chosen automatically falls back to XLA's when it
        does not compile here (`note` says so); asked for explicitly, that is an error. Returns (compiled, the
        attention used)."""
        for impl in (attention, "xla") if attention == "cudnn" else (attention,):
            try:
                return self.get((key, impl), lambda impl=impl: build(impl), args, options), impl
            except Exception as e:  # noqa: BLE001 -- any compile failure of the cuDNN kernel means: use XLA's
                first = first_line(e)
                if impl != "cudnn":
                    raise
                if not automatic:
                    raise LPJaxError(f"--attention cudnn: does not compile here ({first})") from None
                if note:
                    note(f"note: cuDNN attention does not compile here ({first[:160]}); using XLA attention")
        raise AssertionError("unreachable")
