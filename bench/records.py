"""Benchmark records: one JSON object per measured figure, the same shape for every implementation.

    {"impl", "model", "gpus", "lp_delta", "lp", "batch", "metric", "value", "unit", "samples", ...context}

A quantized run's records also say "quantize" ("int8" or "int4") and, for int4, "group_size"; a record without them
(or with null) measured weights in the compute dtype. A decode record says "decode_tokens", the steps it timed
(DECODE_TOKENS unless a runner's --decode-tokens said otherwise; older records lack it and timed DECODE_TOKENS).

The harness (`bench.run`) adds the context every record shares (machine, date, commit); each implementation's
runner adds its own versions. Files are JSON lines, so runners append and a crash loses nothing already measured.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# metric -> (unit, what it is). Every runner measures these names with these units.
METRICS = {
    "prefill_1024": ("ms", "latency of a 1024-token prompt (fills the KV cache; first token's logits)"),
    "prefill_4096": ("ms", "latency of a 4096-token prompt"),
    "decode": ("ms/token", "128 new tokens after a 128-token prompt, one on-device loop (per step, whole batch)"),
    "generate_4096": ("s", "wall time to generate 4096 tokens after a 128-token prompt (paper's Figure 1)"),
    "single_token": ("ms", "one decode step called from the host, as a streaming chat calls it: the host feeds back "
                           "the token ids it was handed (the device keeps them, so none go up), the step runs with "
                           "the greedy choice on the device, the next token ids come back (cache warm, from 256)"),
    "peak_memory": ("GiB", "peak device memory of one GPU (the largest over the GPUs used)"),
}
# torch.compile modes of the torch-compile baseline: those without inductor's own CUDA graphs, since the runner
# captures the compiled decode step in its CUDA graph itself
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# what identifies a record (quantize and group_size are absent from older records)
KEY = ("impl", "model", "gpus", "lp_delta", "batch", "metric", "quantize", "group_size")
PROMPT_LEN = 128
DECODE_TOKENS = 128
SINGLE_TOKEN_AT = 256  # single_token: the cache slot of the timed step (after a prompt of this many tokens)
GENERATE_TOKENS = 4096  # generate_4096: new tokens after the PROMPT_LEN prompt


def make(impl: str, model: str, gpus: int, lp_delta: int, lp: str, batch: int, metric: str, samples: list[float],
         **context) -> dict:
    """A record whose value is the median of `samples`."""
    unit = METRICS[metric][0]
    return dict(impl=impl, model=model, gpus=gpus, lp_delta=lp_delta, lp=lp, batch=batch, metric=metric,
                value=statistics.median(samples), unit=unit, samples=[round(s, 6) for s in samples], **context)


def append(path: Path | None, records: list[dict]) -> None:
    """Print each record as a JSON line and append it to `path` (when given)."""
    lines = [json.dumps(r) for r in records]
    for line in lines:
        print(line, flush=True)
    if path is not None:
        with path.open("a") as f:
            f.write("".join(line + "\n" for line in lines))


def tool_json(path: Path) -> dict | None:
    """A tool's JSON output saved in a file: the file as one object (indented, as bench.serve_load writes it), else
    its last non-empty line (a tool's --json output ends with one, after any log lines); None if the file is empty."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lines = [line for line in text.splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else None


def read(path: Path) -> list[dict]:
    """Records of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with every record that `new` measures again replaced (same impl, model, gpus, Δ, batch, metric and
    quantization)."""
    fresh = {tuple(r.get(k) for k in KEY) for r in new}
    return [r for r in old if tuple(r.get(k) for k in KEY) not in fresh] + new
