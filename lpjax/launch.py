"""One JAX process per device on this host, started by the tool itself (like torchrun): `--processes per-device`.

The tool the user ran becomes a launcher: it re-executes itself as N workers (`python -m <tool> <same arguments>`),
worker i seeing only the i-th of the devices the tool would use, joined by `jax.distributed.initialize` on
127.0.0.1. Each worker launches only its own device's work (the engine is multi-process aware: README, Multi-device
and multi-host). The launcher shows worker 0's stdout and every worker's stderr, and ends the run as its first
failing worker does: the others terminated, that worker's error line printed once, its exit code. No worker
outlives it: Ctrl-C or SIGTERM ends them all (exit 130), and a worker whose launcher dies is killed by the kernel.
"""

from __future__ import annotations

import argparse
import codecs
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from lpjax import cli
from lpjax.errors import LPJaxError

# `--processes auto`: the platforms where it means one process per device. GPUs: on 2 H200s (Llama-2-7B, bf16,
# batch 1, bench/NOTES.md 2026-11-30) per-device decode took 3.72 / 3.42 ms a token against 3.99 / 3.44 in one
# process (Δ=0 / Δ=14, `generate`), and a host-called step 5.41 against 6.01 ms.
AUTO_PER_DEVICE_ON: frozenset[str] = frozenset({"gpu"})

START_TIMEOUT_S = 120.0  # workers not all joined by then: the run ends with one line (JAX itself would wait 300 s)
INTERRUPT_GRACE_S = 3.0  # interrupted workers that have not ended by then are killed
READY_FD_ENV = "LPJAX_WORKER_READY_FD"  # set in a worker: the pipe it writes one byte to once it joined the others
_HELD = ("error: ", "interrupted")  # a worker's ending lines: the launcher prints the failing worker's, once
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")
_PROBE = "import jax; d = jax.local_devices(); print(d[0].platform, len(d))"


def start(args: argparse.Namespace, module: str, argv: list[str] | None = None) -> int | None:
    """Start this run's processes. Returns None in a process that should run the tool (one process, joined to
    other hosts if asked, or a worker joined to its siblings); in the launcher of per-device workers, runs them
    to their end and returns the exit code the tool ends with."""
    ready_fd = os.environ.get(READY_FD_ENV)
    if ready_fd is not None:  # a worker: never relaunched
        _use_cpu_collectives()
        _keep_stdout_for_the_tool()
        cli.init_distributed(args, initialization_timeout=int(START_TIMEOUT_S) + 30)
        _report_joined(int(ready_fd))
        return None
    devices = _per_device_devices(args)
    if devices is None:
        cli.init_distributed(args)
        return None
    return run_workers(worker_commands(module, sys.argv[1:] if argv is None else argv, devices))


@dataclass(frozen=True)
class LocalDevices:
    """The devices this host's workers use: the first `n` of the `visible` ones of `platform`."""
    platform: str
    visible: int
    n: int


def _per_device_devices(args: argparse.Namespace) -> LocalDevices | None:
    """The devices of this run's per-device workers, or None: it runs in this process. The platform is only asked
    (a short subprocess) when the answer depends on it."""
    multi_host = args.coordinator is not None or args.num_processes is not None or args.distributed
    if args.processes == "per-device" and multi_host:
        raise LPJaxError("--processes per-device starts its own processes on this host; it does not combine with "
                         "--coordinator, --num-processes or --distributed (JAX_COORDINATOR_ADDRESS, "
                         "JAX_NUM_PROCESSES): multi-host runs one process per host")
    wanted = args.processes == "per-device" or (args.processes == "auto" and bool(AUTO_PER_DEVICE_ON))
    if not wanted or multi_host or args.devices == 1:
        return None
    if args.processes == "auto" and not _may_have(AUTO_PER_DEVICE_ON):
        return None
    if _backend_started():
        raise RuntimeError("launch.start: a JAX backend already runs in the launcher; start the workers before "
                           "anything touches a device (on GPU it holds memory on the devices the workers need)")
    platform, visible = local_devices()
    if args.processes == "auto" and platform not in AUTO_PER_DEVICE_ON:
        return None
    if platform == "tpu":
        raise LPJaxError("--processes per-device: not on TPU, where JAX runs one process per host; use --processes "
                         "one")
    n = visible if args.devices is None else args.devices
    if n > visible:
        raise LPJaxError(f"--devices {n}: only {visible} {platform.upper()} device(s) are visible")
    return LocalDevices(platform, visible, n) if n > 1 else None


def _may_have(platforms: frozenset[str]) -> bool:
    """Whether this host may have devices of `platforms`, asked without starting anything: an NVIDIA driver for
    "gpu". It spares CPU-only hosts the probe subprocess (`local_devices`) at every start of a tool."""
    if os.environ.get("JAX_PLATFORMS", "").strip() in ("cpu", "tpu"):
        return False
    driver = os.path.isdir("/proc/driver/nvidia/gpus") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
    return "gpu" in platforms and driver


def _backend_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(xla_bridge and getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def local_devices() -> tuple[str, int]:
    """(platform, count) of the devices JAX sees on this host, asked in a subprocess: the launcher must not start a
    backend itself (on GPU it would take memory on every device the workers need)."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines() or [f"exit code {p.returncode}"]
        raise LPJaxError(f"--processes per-device: could not list this host's devices: {lines[-1]}")
    platform, count = p.stdout.split()[-2:]
    return platform, int(count)


@dataclass(frozen=True)
class WorkerCommand:
    argv: tuple[str, ...]
    env: dict[str, str]


def worker_commands(module: str, argv: list[str], devices: LocalDevices) -> list[WorkerCommand]:
    """The workers' command lines and environments: worker i sees the i-th device the tool would use (on GPU the
    i-th of CUDA_VISIBLE_DEVICES, when set) and finds the others at a free port of 127.0.0.1."""
    base = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(devices.n))
    gpus = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()] or \
        [str(i) for i in range(devices.visible)]
    commands = []
    for i in range(devices.n):
        env = dict(base, JAX_PROCESS_ID=str(i))
        if devices.platform == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        elif devices.platform == "cpu":
            flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
            env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=1"])
            env["JAX_NUM_CPU_DEVICES"] = "1"
        commands.append(WorkerCommand((sys.executable, "-m", module, *argv), env))
    return commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- in a worker ----

def _use_cpu_collectives() -> None:
    """CPU devices of several processes talk through gloo (the default on recent JAX; named for older ones)."""
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        pass


def _keep_stdout_for_the_tool() -> None:
    """Python's stdout stays the worker's stdout; the file descriptor 1 that native libraries write to (gloo's
    connection chatter on CPU, NCCL_DEBUG) becomes stderr, so worker 0's stdout is the tool's output alone."""
    sys.stdout.flush()
    tool_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(tool_fd, "w", buffering=1 if sys.stdout.line_buffering else -1, encoding=sys.stdout.encoding,
                      errors=sys.stdout.errors)


def _report_joined(fd: int) -> None:
    os.write(fd, b"j")
    os.close(fd)


# ---- in the launcher ----

class _Stderr:
    """One worker's stderr, passed through as it comes, except its ending lines (`error: ...`, `interrupted`),
    which are held: the launcher prints the failing worker's, once. Lines end at a newline or a carriage return
    (progress bars redraw with one): a line is held only while its start could still be an ending line."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # the start of the current line, while it may be an ending line
        self.holding = True  # at the start of a line, or still holding it
        self.ending: str | None = None  # the last ending line

    def feed(self, data: bytes, final: bool = False) -> str:
        """What to pass through of `data` now."""
        out = []
        for ch in self.decoder.decode(data, final):
            if ch in "\r\n":
                if self.holding and (self.held.startswith(_HELD[0]) or self.held == _HELD[1]):
                    self.ending = self.held
                else:
                    out.append(self.held + ch)
                self.held, self.holding = "", True
            elif self.holding:
                self.held += ch
                if not (self.held.startswith(_HELD[0]) or any(h.startswith(self.held) for h in _HELD)):
                    out.append(self.held)
                    self.held, self.holding = "", False
            else:
                out.append(ch)
        if final:
            out.append(self.held)
            self.held = ""
        return "".join(out)


def _die_with_parent_hook():
    """Linux: a function for Popen's preexec_fn that has the kernel kill the worker when its launcher dies, even by
    SIGKILL. Resolved here, before the fork: the child only calls it (no imports or allocations between fork and
    exec)."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)

    def hook():  # pragma: no cover - runs in the child between fork and exec
        prctl(pr_set_pdeathsig, sigkill)
        if os.getppid() != parent:  # the launcher died before the call
            os._exit(1)

    return hook


def run_workers(commands: list[WorkerCommand], start_timeout_s: float = START_TIMEOUT_S) -> int:
    """Run the workers to their end; return the run's exit code. Worker 0 has this process's stdin and stdout; the
    others have none (the tools print on process 0 only). Every worker's stderr passes through `_Stderr`."""
    sys.stdout.flush()
    sys.stderr.flush()
    hook = _die_with_parent_hook()
    workers, ready_reads = [], []
    try:
        for i, cmd in enumerate(commands):
            ready_r, ready_w = os.pipe()
            ready_reads.append(ready_r)
            env = dict(cmd.env, **{READY_FD_ENV: str(ready_w)})
            if i == 0 and sys.stderr.isatty():
                env[cli.STDERR_TERMINAL_ENV] = "1"
            try:
                workers.append(subprocess.Popen(
                    cmd.argv, env=env, pass_fds=(ready_w,), preexec_fn=hook, stderr=subprocess.PIPE,
                    stdin=None if i == 0 else subprocess.DEVNULL, stdout=None if i == 0 else subprocess.DEVNULL))
            finally:
                os.close(ready_w)
    except BaseException:
        _stop(workers)
        for fd in ready_reads:
            os.close(fd)
        raise
    events: queue.Queue = queue.Queue()
    for i, (p, ready_r) in enumerate(zip(workers, ready_reads)):
        for target, what in ((_read_stream, p.stderr), (_read_ready, ready_r), (_wait, p)):
            threading.Thread(target=target, args=(i, what, events), daemon=True).start()
    def interrupt(signum, frame):  # SIGTERM: interrupt the workers as Ctrl-C would, and this process
        for p in workers:
            p.send_signal(signal.SIGINT)
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if in_main else None
    try:
        return _supervise(workers, events, start_timeout_s)
    except KeyboardInterrupt:
        _stop(workers, INTERRUPT_GRACE_S)
        raise
    finally:
        _stop(workers)
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _read_stream(i: int, stream, events: queue.Queue) -> None:
    with stream:
        while data := os.read(stream.fileno(), 65536):
            events.put(("stderr", i, data))
    events.put(("eof", i, None))


def _read_ready(i: int, fd: int, events: queue.Queue) -> None:
    joined = os.read(fd, 1)
    os.close(fd)
    if joined:
        events.put(("joined", i, None))


def _wait(i: int, p: subprocess.Popen, events: queue.Queue) -> None:
    events.put(("exit", i, p.wait()))


def _supervise(workers: list[subprocess.Popen], events: queue.Queue, start_timeout_s: float) -> int:
    """The launcher's event loop: pass stderr through, and at the first failure stop the others and end as that
    worker did."""
    n = len(workers)
    streams = [_Stderr() for _ in workers]
    open_streams, exited, joined = set(range(n)), {}, set()
    failed: int | None = None  # the first worker that failed: only its output still passes
    deadline = time.monotonic() + start_timeout_s
    while open_streams or len(exited) < n:
        waiting = len(joined) < n and failed is None and time.monotonic() < deadline
        try:
            kind, i, value = events.get(timeout=max(0.0, deadline - time.monotonic()) + 0.01 if waiting else None)
        except queue.Empty:
            missing = [str(i) for i in range(n) if i not in joined and i not in exited]
            if len(joined) < n and failed is None and missing:
                _stop(workers)
                print(f"error: --processes per-device: worker(s) {', '.join(missing)} of {n} did not join the others "
                      f"within {start_timeout_s:.0f} s (is 127.0.0.1 reachable? a proxy variable can stop it)",
                      file=sys.stderr, flush=True)
                return cli.EXIT_BAD_INPUT
            continue
        if kind == "joined":
            joined.add(i)
        elif kind in ("stderr", "eof"):
            text = streams[i].feed(value or b"", final=kind == "eof")
            if kind == "eof":
                open_streams.discard(i)
            if text and (failed is None or failed == i):
                sys.stderr.write(text)
                sys.stderr.flush()
        elif kind == "exit":
            exited[i] = value
            if value != 0 and failed is None:
                failed = i
                _stop([w for j, w in enumerate(workers) if j != i])
    if failed is None:
        return 0
    code = exited[failed]
    ending = streams[failed].ending
    if ending and ending.startswith(_HELD[0]):
        print(ending, file=sys.stderr, flush=True)
    elif ending == _HELD[1]:
        raise KeyboardInterrupt  # a worker was interrupted (Ctrl-C reaches all of them): so is the run
    else:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        print(f"error: --processes per-device: worker {failed} of {n} {how}", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


def _stop(workers: list[subprocess.Popen], grace_s: float = 0.0) -> None:
    """Give the workers still running `grace_s` to end by themselves (an interrupted one ends its work: a sweep
    keeps its partial results), then kill the rest and reap them all. Not SIGTERM: JAX's distributed runtime takes
    it for a preemption notice and runs on."""
    end = time.monotonic() + grace_s
    for p in workers:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    for p in workers:
        p.wait()
