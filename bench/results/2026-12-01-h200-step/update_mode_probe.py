"""Probe: which host-called step variants survive XLA's update-free command buffers, and their ms.

Run from the repository root, once plain and once with
`XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP`:
`PYTHONPATH=. python bench/results/2026-12-01-h200-step/update_mode_probe.py smollm2-135m 1`
(output: va-default.txt, va-SKIP_TEMP.txt). bench/NOTES.md row 59."""
import json
import statistics
import sys

from bench.common import prompt_ids
from bench.records import SINGLE_TOKEN_AT
from bench.step_latency import timed
from lpjax.engine import Engine
from lpjax.runtime.host_step import HostStep

model, devices = sys.argv[1], int(sys.argv[2])
engine = Engine.load(f"random:{model}", "", devices, None)
cache = engine.init_cache(1, 2 * SINGLE_TOKEN_AT)
_, cache, n, pad = engine.prefill(cache, [prompt_ids(SINGLE_TOKEN_AT, engine.config.vocab_size)])
state = {"cache": cache}
for name, span, pinned in [("one_program", None, False), ("chain_4", 4, False), ("chain_2", 2, False),
                           ("one_program_pinned", None, True), ("chain_4_pinned", 4, True)]:
    step = HostStep(engine.programs, span=span, pinned=pinned)
    print("start", name, flush=True)
    def call(tokens, step=step):
        out, state["cache"] = step.next_token(state["cache"], tokens, n, pad)
        return out
    print(json.dumps({name: round(statistics.median(timed(20, call)), 4)}), flush=True)
