"""Probe: the host-called step's ms by programs per step (span), pinned result, one model and device count.

Run from the repository root: `PYTHONPATH=. python bench/results/2026-12-01-h200-step/span_probe_wide.py smollm2-135m 1`
(output: span-wide.jsonl). bench/NOTES.md rows 60 and 68."""
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
out = dict(model=model, devices=devices, stages=len(engine.programs.layout.stages))
for span in [None, 15, 10, 8, 6, 4, 3, 2, 8, 4, None]:
    step = HostStep(engine.programs, span=span, pinned=True)
    def call(tokens, step=step):
        o, state["cache"] = step.next_token(state["cache"], tokens, n, pad)
        return o
    out.setdefault(f"span_{span or 'all'}", []).append(round(statistics.median(timed(30, call)), 3))
print(json.dumps(out), flush=True)
