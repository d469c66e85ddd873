"""The benchmark harness: every implementation, model shape, GPU count, LP Δ and batch size, in one run.

    python -m bench.run --models llama2-7b,llama3.2-3b --devices 1,2,4 --delta 0,8,14 --batch 1,8 \
        --impls lpjax,torch-compile,torch-tp,hf-eager,hf-static-compile --machine h200

`--quantize none,int8,int4` runs every configuration once per quantization: the runners that quantize (`lpjax`,
`torch-compile`, `torch-tp`) get `--quantize` (and `--group-size` for int4); the transformers baselines run only
unquantized weights and are skipped, with a line saying so, for the others. Records say `quantize` (and
`group_size`).

Each configuration runs in its own subprocess (`bench.lpjax_bench`, `bench.torch_tp` for `torch-tp` and
`torch-compile`, `bench.hf_baselines`), so JAX and PyTorch never share a GPU's memory and each reports its own peak;
every runner takes the same flags (`bench.common`). The records (see `bench.records`) are merged into
`bench/results/<machine>.json` (a record measured again replaces the old one), then `bench.report` renders the
tables and plots. A configuration that fails is reported at the end; the others still count.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import records
from bench.common import (
    DEFAULT_GROUP_SIZE,
    QUANTIZE_MODES,
    add_decode_tokens_arg,
    check_counts,
    exit_code,
    parse_ints,
    parse_metrics,
    parse_names,
)
from bench.records import COMPILE_MODES, DECODE_TOKENS
from bench.report import quantize_label
from lpjax.config import PRESETS
from lpjax.errors import LPJaxError
from lpjax.plan import default_plan, parse_deltas
from lpjax.quantize import PRODUCT_KERNELS

IMPLS = {  # name -> (module, what it is)
    "lpjax": ("bench.lpjax_bench", "this library: JAX/XLA, shard_map tensor parallelism, on-device decode loop"),
    "torch-tp": ("bench.torch_tp", "PyTorch tensor-parallel LP (the paper's method): NCCL, static cache, eager "
                                   "decode step in a CUDA graph"),
    "torch-compile": ("bench.torch_tp", "the same PyTorch LP model with prefill and decode step compiled by "
                                        "torch.compile (inductor, fullgraph, functional collectives), the compiled "
                                        "step in a CUDA graph"),
    "hf-eager": ("bench.hf_baselines", "transformers LlamaForCausalLM.generate, eager, default dynamic cache"),
    "hf-static-compile": ("bench.hf_baselines", "transformers generate with a static cache and torch.compile"),
}
SINGLE_GPU = ("hf-eager", "hf-static-compile")  # transformers baselines run on one GPU only
QUANTIZED = ("lpjax", "torch-tp", "torch-compile")  # the runners with --quantize / --group-size
RESULTS = Path(__file__).parent / "results"
VARIANT_METRICS = ("decode", "single_token")


@dataclass(frozen=True)
class Job:
    impl: str
    model: str
    gpus: int
    deltas: tuple[int, ...]
    batch: int
    metrics: tuple[str, ...]
    variant: str = ""  # lpjax run under extra XLA flags: records say impl "lpjax+<variant>"
    quantize: str | None = None  # "int8" / "int4": weight-only quantized products
    group_size: int = DEFAULT_GROUP_SIZE  # int4's inputs per group
    quant_kernel: str = "xla"  # lpjax's decode products of quantized weights; another: records say "lpjax+<it>"

    def quantization(self) -> dict:
        """The record fields of this job's weights (null for the compute dtype)."""
        return {"quantize": self.quantize, "group_size": self.group_size if self.quantize == "int4" else None}

    def quantize_flags(self) -> list[str]:
        if not self.quantize:
            return []
        return ["--quantize", self.quantize] + (["--group-size", str(self.group_size)] if self.quantize == "int4"
                                                else [])

    def command(self, json_out: Path, repeats: int, long_repeats: int, device: str, compile_mode: str,
                decode_tokens: int = DECODE_TOKENS) -> list[str]:
        """The runner's command line: the flags every runner shares (`bench.common.add_runner_args`), then its own."""
        cmd = [sys.executable, "-m", IMPLS[self.impl][0], "--model", self.model, "--devices", str(self.gpus),
               "--delta", ",".join(map(str, self.deltas)), "--batch", str(self.batch),
               "--metrics", ",".join(self.metrics), "--repeats", str(repeats), "--long-repeats", str(long_repeats),
               "--decode-tokens", str(decode_tokens), "--json-out", str(json_out)]
        if self.impl == "lpjax":
            kernel = ["--quant-kernel", self.quant_kernel] if self.quantize else []
            return cmd + ["--impl-name", self.name()] + self.quantize_flags() + kernel
        if self.impl in SINGLE_GPU:
            return cmd + ["--impl", self.impl, "--device", device]
        cmd += ["--device", device, "--impl-name", self.impl] + self.quantize_flags()
        return cmd + (["--compile", compile_mode] if self.impl == "torch-compile" else [])

    def name(self) -> str:
        """The impl its records carry: the runner's, then its XLA-flag variant and its quantized-product kernel."""
        return (self.impl + (f"+{self.variant}" if self.variant else "")
                + (f"+{self.quant_kernel}" if self.quantize and self.quant_kernel != "xla" else ""))

    def describe(self) -> str:
        name = self.name()
        label = quantize_label(self.quantization())
        name += f" {label}" if label else ""
        deltas = ",".join(map(str, self.deltas))
        return f"{name} {self.model} gpus={self.gpus} Δ={deltas} batch={self.batch} [{','.join(self.metrics)}]"


def model_deltas(models: list[str], default: list[int], overrides: list[str]) -> dict[str, list[int]]:
    """Δ values per model: `--delta` for all, `--delta-for MODEL=0,10` for one."""
    out = {m: list(default) for m in models}
    for spec in overrides:
        model, _, values = spec.partition("=")
        if model not in out or not values:
            raise LPJaxError(f"--delta-for {spec}: expected MODEL=D1,D2 for one of --models ({', '.join(models)})")
        out[model] = parse_deltas(values, "--delta-for")
    return out


def plan_jobs(models, gpus, deltas: dict[str, list[int]], batches, impls, metrics, long_metrics, long_impls,
              long_models, long_batch, quantizes=(None,), group_size: int = DEFAULT_GROUP_SIZE,
              quant_kernels=("xla",)) -> list[Job]:
    """The configurations to run: Δ values a model cannot take are dropped; lpjax runs all Δ of a configuration in
    one process (one warm compile cache), the PyTorch runners one Δ per process. Slow metrics run only where asked.
    Each quantization (None: the compute dtype) repeats the lot, without the runners that cannot quantize; lpjax's
    quantized jobs run once per kernel of `quant_kernels`."""
    for quantize in quantizes:
        for impl in impls:
            if quantize and impl not in QUANTIZED:
                print(f"[run] skipping {impl} {quantize}: the transformers baselines run unquantized weights only",
                      file=sys.stderr)
    jobs = []
    for model in models:
        if model not in PRESETS:
            raise LPJaxError(f"--models {model}: not a preset ({', '.join(PRESETS)})")
        n_layers = PRESETS[model].n_layers
        valid = []
        for d in deltas[model]:
            try:
                default_plan(d, n_layers)
                valid.append(d)
            except LPJaxError as e:
                print(f"[run] {model}: skipping Δ={d} ({e})", file=sys.stderr)
        for quantize in quantizes:
            for impl in (i for i in impls if not quantize or i in QUANTIZED):
                for n in ([1] if impl in SINGLE_GPU else gpus):
                    for batch in batches:
                        wanted = list(metrics)
                        if impl in long_impls and model in long_models and batch == long_batch:
                            wanted += long_metrics
                        groups = [tuple(valid)] if impl == "lpjax" else [(d,) for d in valid]
                        kernels = quant_kernels if impl == "lpjax" and quantize else ("xla",)
                        jobs += [Job(impl, model, n, g, batch, tuple(wanted), quantize=quantize,
                                     group_size=group_size, quant_kernel=k) for k in kernels for g in groups]
    return jobs


def parse_quantize(text: str) -> list[str | None]:
    """`--quantize none,int8,int4` -> [None, "int8", "int4"]."""
    names = parse_names(text)
    choices = ("none", *QUANTIZE_MODES)
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise LPJaxError(f"--quantize {text}: unknown {', '.join(unknown) or 'empty'} "
                         f"(choose from {', '.join(choices)})")
    return [None if n == "none" else n for n in dict.fromkeys(names)]


def parse_quant_kernels(text: str) -> tuple[str, ...]:
    """`--quant-kernels xla,pallas` -> ("xla", "pallas"), each one of lpjax's `PRODUCT_KERNELS`."""
    names = parse_names(text)
    unknown = [n for n in names if n not in PRODUCT_KERNELS]
    if unknown or not names:
        raise LPJaxError(f"--quant-kernels {text}: unknown {', '.join(unknown) or 'empty'} "
                         f"(choose from {', '.join(PRODUCT_KERNELS)})")
    return tuple(dict.fromkeys(names))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def with_variants(jobs: list[Job], variants: dict[str, str]) -> list[Job]:
    """Each lpjax job again under each variant's XLA flags, decode and single-token only (measured in the same run as
    the default)."""
    base = [j for j in jobs if j.impl == "lpjax"]
    extra = [dataclasses.replace(j, variant=v, metrics=tuple(m for m in j.metrics if m in VARIANT_METRICS))
             for v in variants for j in base]
    return jobs + extra


def parse_variants(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        if not name or not flags.strip().startswith("--"):
            raise LPJaxError(f"--lpjax-variant {spec}: expected NAME=--xla_flag=value [...]")
        out[name] = flags.strip()
    return out


def run_job(job: Job, args, context: dict) -> tuple[list[dict], str | None]:
    """Run one configuration's subprocess; its records with the shared context, and an error line if it failed."""
    env = dict(os.environ, NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"), PYTHONUNBUFFERED="1")
    if job.variant:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.variants[job.variant]).strip()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.jsonl"
        cmd = job.command(out, args.repeats, args.long_repeats, args.device, args.torch_compile_mode,
                          args.decode_tokens)
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=args.timeout)
            error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["no output"])[-1]
            log = proc.stderr
        except subprocess.TimeoutExpired as e:
            error, log = f"timed out after {args.timeout} s", (e.stderr or b"").decode(errors="replace")
        if args.verbose or error:
            sys.stderr.write(log[-4000:])
        got = records.read(out) if out.exists() else []
    elapsed = time.perf_counter() - t
    print(f"[run] {job.describe()}: {len(got)} records in {elapsed:.0f} s" + (f"; FAILED: {error}" if error else ""),
          file=sys.stderr, flush=True)
    return [dict(r, **context, **job.quantization()) for r in got], error


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama2-7b,llama3.2-3b", help=f"presets: {', '.join(PRESETS)}")
    p.add_argument("--devices", default="1,2,4", help="GPU counts (transformers baselines: 1 only)")
    p.add_argument("--delta", default="0,14", help="LP Δ values; the range ends two layers before the last")
    p.add_argument("--delta-for", action="append", default=[], metavar="MODEL=D1,D2",
                   help="Δ values for one model instead of --delta (repeatable), e.g. llama3.2-3b=0,10")
    p.add_argument("--batch", default="1")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"of: {', '.join(IMPLS)}")
    p.add_argument("--metrics", default="prefill_1024,prefill_4096,decode,single_token,peak_memory")
    p.add_argument("--long-metrics", default="generate_4096", help="slow metrics, only for --long-impls at "
                                                                   "--long-batch")
    p.add_argument("--long-impls", default="lpjax,torch-tp,torch-compile")
    p.add_argument("--torch-compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the torch-compile baseline")
    p.add_argument("--quantize", default="none", metavar="none,int8,int4",
                   help="weight quantizations to run, each a whole pass over the other axes (the transformers "
                        "baselines only unquantized)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, metavar="G",
                   help="int4's inputs per group, passed to every runner")
    p.add_argument("--quant-kernels", default="xla", metavar="xla,pallas",
                   help="lpjax's quantized jobs once per kernel of its decode products (--quant-kernel)")
    p.add_argument("--long-models", default="llama2-7b")
    p.add_argument("--long-batch", type=int, default=1)
    p.add_argument("--lpjax-variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="also run lpjax under extra XLA flags, recorded as impl lpjax+NAME (repeatable)")
    p.add_argument("--variants-only", action="store_true", help="run only the --lpjax-variant jobs")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per metric (median reported)")
    p.add_argument("--long-repeats", type=int, default=1, help="timed runs of the long metrics")
    add_decode_tokens_arg(p)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the harness's own test")
    p.add_argument("--machine", default=os.environ.get("LPJAX_MACHINE", "local"),
                   help="machine name: results go to bench/results/<machine>.json")
    p.add_argument("--out", type=Path, default=None, help="records file (default bench/results/<machine>.json)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--dry-run", action="store_true", help="list the configurations and exit")
    p.add_argument("--verbose", action="store_true", help="show every runner's progress, not only failures")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The harness, under the runners' error contract (`bench.common.exit_code`)."""
    return exit_code(harness, argv)


def harness(argv=None) -> int:
    args = parse_args(argv)
    impls = parse_names(args.impls)
    for name in impls:
        if name not in IMPLS:
            raise LPJaxError(f"--impls {name}: unknown (choose from {', '.join(IMPLS)})")
    metrics = parse_metrics(args.metrics, allow_empty=True)
    long_metrics = parse_metrics(args.long_metrics, "--long-metrics", allow_empty=True)
    models = parse_names(args.models)
    if args.group_size < 1:
        raise LPJaxError(f"--group-size {args.group_size}: must be positive")
    check_counts(args)
    deltas = model_deltas(models, parse_deltas(args.delta), args.delta_for)
    jobs = plan_jobs(models, parse_ints(args.devices, "--devices", 1), deltas, parse_ints(args.batch, "--batch", 1),
                     impls, metrics, long_metrics, parse_names(args.long_impls), parse_names(args.long_models),
                     args.long_batch, parse_quantize(args.quantize), args.group_size,
                     parse_quant_kernels(args.quant_kernels))
    args.variants = parse_variants(args.lpjax_variant)
    jobs = with_variants(jobs, args.variants)
    if args.variants_only:
        jobs = [j for j in jobs if j.variant]
    if args.dry_run:
        for job in jobs:
            print(job.describe())
        return 0
    out = args.out or RESULTS / f"{args.machine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    context = dict(machine=args.machine, date=datetime.date.today().isoformat(), commit=git_commit())
    failures = []
    for i, job in enumerate(jobs):
        print(f"[run] {i + 1}/{len(jobs)} {job.describe()}", file=sys.stderr, flush=True)
        got, error = run_job(job, args, context)
        if error:
            failures.append(f"{job.describe()}: {error}")
        # merge after every configuration: an interrupted run keeps what it measured
        old = records.read(out) if out.exists() else []
        out.write_text("".join(json.dumps(r) + "\n" for r in records.merge(old, got)))
    from bench.report import markdown_tables

    print(markdown_tables(records.read(out)))
    print(f"[run] records in {out}", file=sys.stderr)
    for f in failures:
        print(f"[run] failed: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
