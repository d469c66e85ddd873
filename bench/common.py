"""What every benchmark runner shares: its flags, the benchmark prompt, the plans, the records and the error contract.

The runners are `bench.lpjax_bench`, `bench.torch_tp` and `bench.hf_baselines` (each configuration of `bench.run`
runs one of them in a subprocess), and the single-process readings `bench.quick`, `bench.profile` and
`bench.step_latency`. The same thing has the same flag in all of them:

    --model NAME|DIR    a preset (`llama2-7b` or `random:llama2-7b`: random weights at its shape) or a checkpoint
    --devices N         devices (GPUs) to use; a list `1,2` where a runner sweeps them
    --delta D[,D...]    Δ values: Δ paired layers ending two before the last (`lpjax.plan.default_plan`)
    --lp START:END      one explicit plan instead of the Δ defaults
    --batch B[,B...]    batch sizes
    --repeats R         timed runs of every metric (the median is reported)
    --long-repeats R    timed runs of the long metrics (generate_4096)
    --decode-tokens N   decode steps each decode figure times (default 128, the records' definition; fewer only to
                        check the harness quickly: each decode record says its count)
    --dtype D           weights and compute, of `lpjax.weights.DTYPES` (default: bfloat16 on GPUs, float32 on CPUs)
    --json-out FILE     records appended as JSON lines
    --quantize int8|int4  weight-only quantized products (the runners that have them); --group-size G: int4's
                        inputs per group (default 128)

Nothing here imports torch or initialises JAX's devices: the JAX and PyTorch runners both import it.
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Callable
from pathlib import Path

from bench import records
from bench.records import DECODE_TOKENS, METRICS
from lpjax.config import PRESETS, ModelConfig, preset, read_hf_config
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan, default_plan, parse_deltas
from lpjax.weights import DTYPES

EXIT_BAD_INPUT = 2
UNITS = {metric: unit for metric, (unit, _) in METRICS.items()}
DEFAULT_METRICS = ("prefill_1024", "prefill_4096", "decode", "single_token", "peak_memory")
QUANTIZE_MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128


# ---------------------------------------------------------------------------------------------- the error contract


def exit_code(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a runner's `main`: bad input (an `LPJaxError`) ends in one `error: ...` line on stderr and exit code 2,
    never a traceback; anything else is a bug and keeps its traceback."""
    try:
        return main(argv) or 0
    except LPJaxError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def log(*parts) -> None:
    """Progress on stderr (stdout carries the records)."""
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- flags


def add_runner_args(p: argparse.ArgumentParser, devices_help: str) -> None:
    """The flags every runner of `bench.run` takes, under the names every bench tool uses for them."""
    p.add_argument("--model", default="llama2-7b", help=f"preset ({', '.join(PRESETS)}; random weights), or an HF "
                                                        "checkpoint directory where the runner reads one")
    p.add_argument("--devices", type=int, default=1, help=devices_help)
    p.add_argument("--delta", default="0", help="Δ, or a list 0,14: paired layers ending two before the last")
    p.add_argument("--lp", default=None, metavar="START:END", help="an explicit plan instead of --delta")
    p.add_argument("--batch", default="1", help="batch size, or a list 1,8")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"subset of {', '.join(UNITS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per metric (median reported)")
    p.add_argument("--long-repeats", type=int, default=1, help="timed runs of generate_4096")
    add_decode_tokens_arg(p)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bfloat16 on GPUs, float32 on CPUs")
    p.add_argument("--json-out", default=None, help="append one JSON line per metric to this file")


def add_decode_tokens_arg(p: argparse.ArgumentParser) -> None:
    """`--decode-tokens`: the harness passes its value to every runner."""
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS, metavar="N",
                   help=f"decode steps each decode figure times (default {DECODE_TOKENS}, the records' definition; "
                        "fewer only to check the harness quickly)")


def add_quantize_args(p: argparse.ArgumentParser, scheme: str) -> None:
    """`--quantize` and `--group-size`, as every runner that quantizes names them; `scheme` says what this one does
    (which products, the LM head)."""
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help=f"weight-only quantized products (default: none): {scheme}")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help=f"--quantize int4: inputs per group, each with its scale (default {DEFAULT_GROUP_SIZE})")


def quantize_group(args: argparse.Namespace) -> int:
    """The group size of `--quantize int4` (the default when not given), or the one-line reason the flags clash."""
    if args.group_size is not None and args.quantize != "int4":
        raise LPJaxError(f"--group-size {args.group_size}: only --quantize int4 has groups")
    if args.group_size is not None and args.group_size < 1:
        raise LPJaxError(f"--group-size {args.group_size}: must be positive")
    return DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size


def check_counts(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.long_repeats < 1:
        raise LPJaxError("--repeats and --long-repeats must be at least 1")
    if args.decode_tokens < 1:
        raise LPJaxError(f"--decode-tokens {args.decode_tokens}: must be at least 1")


def parse_names(text: str) -> list[str]:
    """`a,b` -> ["a", "b"] (blanks dropped)."""
    return [x.strip() for x in str(text).split(",") if x.strip()]


def parse_ints(text: str, flag: str, minimum: int = 0) -> list[int]:
    """A comma-separated list of integers (`1` or `1,8`), each at least `minimum`."""
    try:
        values = [int(x) for x in parse_names(text)]
    except ValueError:
        raise LPJaxError(f"{flag} {text}: expected integers, e.g. 1 or 1,8") from None
    if not values or any(v < minimum for v in values):
        raise LPJaxError(f"{flag} {text}: expected integers >= {minimum}")
    return values


def parse_metrics(text: str, flag: str = "--metrics", allow_empty: bool = False) -> list[str]:
    metrics = parse_names(text)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not (metrics or allow_empty):
        raise LPJaxError(f"{flag} {text}: unknown {', '.join(unknown) or 'empty'} (choose from {', '.join(METRICS)})")
    return metrics


def check_json_out(path: str | None) -> None:
    if path and not Path(path).resolve().parent.is_dir():
        raise LPJaxError(f"--json-out {path}: directory {Path(path).parent} does not exist")
    if path and Path(path).is_dir():
        raise LPJaxError(f"--json-out {path}: is a directory")


# ---------------------------------------------------------------------------------------------- model and plans


def resolve_model(name: str) -> tuple[str, ModelConfig, Path | None]:
    """`llama2-7b` / `random:llama2-7b` (a preset, random weights) or an HF checkpoint directory -> (record name,
    config, directory or None)."""
    path = Path(name)
    if path.is_dir():
        config, _ = read_hf_config(path)
        return path.name, config, path
    if "/" in name or name.startswith("."):
        raise LPJaxError(f"--model {name}: no such directory (and not a preset name)")
    short = name.removeprefix("random:")
    return short, preset(short), None


def engine_model(name: str) -> str:
    """`--model` as `Engine.load` takes it: a bare preset name means its random weights."""
    return f"random:{name}" if name in PRESETS else name


def plans_for(config: ModelConfig, deltas: list[int], lp: str | None) -> list[LPPlan]:
    """`--lp START:END` (one explicit plan) or the default range of each `--delta` Δ."""
    if lp:
        return [LPPlan.parse(lp, config.n_layers)]
    return [default_plan(d, config.n_layers) for d in deltas]


def runner_plans(args: argparse.Namespace, config: ModelConfig) -> list[LPPlan]:
    """The plans of a runner's `--delta` / `--lp`."""
    return plans_for(config, parse_deltas(args.delta), args.lp)


def prompt_ids(n: int, vocab: int, bos: int | None = None) -> list[int]:
    """The benchmark prompt: BOS (1 if the model names none), then a fixed pattern of ids, n in all, each below
    `vocab`. Every runner times this prompt (its values do not change the speed; every row of a batch is the same)."""
    return [(1 if bos is None else bos) % vocab] + [(100 + i % 150) % vocab for i in range(n - 1)]


def model_prompt(n: int, config: ModelConfig) -> list[int]:
    """The benchmark prompt of n tokens for `config`'s vocabulary and BOS."""
    return prompt_ids(n, config.vocab_size, config.bos_token_id)


# ---------------------------------------------------------------------------------------------- records


def emit(record: dict, json_out: str | Path | None) -> None:
    """One JSON line on stdout and, when asked, appended to --json-out."""
    records.append(Path(json_out) if json_out else None, [record])


def host_peak_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB): a CPU run's `peak_memory`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
