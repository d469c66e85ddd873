"""Test session set-up: 8 forced CPU devices (so sharding is tested without GPUs), offline HF, tiny checkpoints,
one compile per program per session, and the command lines run in this process (`run_main`)."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import COMPILE_FLAGS, with_device_count  # noqa: E402

# 8 CPU devices, and the session's compile flags (helpers.COMPILE_FLAGS) where XLA_FLAGS does not set them: the
# command lines that tests start inherit them (helpers.subprocess_env), so they compile as fast and share the
# session's compiled programs
XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
XLA_FLAGS += "".join(f" {flag}={value}" for flag, value in COMPILE_FLAGS.items() if flag not in XLA_FLAGS)
os.environ["XLA_FLAGS"] = with_device_count(XLA_FLAGS, 8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# PyTorch on one thread, here and in the processes tests start: its work here is tiny matmuls, which two threads
# only slow down (a 3x slower transformers generate when the 2 cores are shared), and pytest-xdist's workers take
# one core each
os.environ.setdefault("OMP_NUM_THREADS", "1")
# inductor compiles its C++ kernels in the process that compiles, not in a pool of workers that each import torch
# again (two per compiling process here, each rank of a world=2 test its own): test_torch_baselines' inductor programs
# took 144 CPU-s instead of 176 on a machine without inductor's cache, and 36 instead of 40 with it
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# glibc's allocator in the workers and the command lines they start: large blocks from a heap that grows by 1 GB and
# is never trimmed, instead of fresh mmaps returned on free (so zeroed and faulted in again each time): test_gguf and
# test_engine took 108-118 s against 126-135 s in one process (2 cores; the three together, no one alone).
for variable, value in (("MALLOC_MMAP_THRESHOLD_", 1 << 32), ("MALLOC_TRIM_THRESHOLD_", 1 << 36),
                        ("MALLOC_TOP_PAD_", 1 << 30)):
    os.environ.setdefault(variable, str(value))
# The session's compiled programs are kept in a fresh directory (never the user's cache), by the tests and by the
# command lines they start: each program is compiled once per session, however many engines run it.
# pytest-xdist's workers inherit the directories, and the process that made them removes them at its end.
for variable, prefix in (("LPJAX_COMPILE_CACHE", "lpjax-test-xla-"),
                         ("LPJAX_GGUF_CACHE", "lpjax-test-gguf-")):  # GGUF companion directories (tokenizer files)
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)

import pytest  # noqa: E402
from helpers import CORPUS, make_checkpoint  # noqa: E402

from lpjax.cli import enable_compile_cache  # noqa: E402

enable_compile_cache()  # before the first compile: JAX decides once per process whether the cache is used


# The costliest files first: pytest-xdist (pyproject's addopts) hands each worker whole files in this order, so the
# last ones to start are quick and no worker runs alone for long at the end. The figures are each file's CPU seconds
# (its processes and theirs) in a whole run of the suite on a 2-core CPU without inductor's cache (inductor compiling
# test_torch_baselines' C++ kernels, as on a fresh machine); a file not listed counts as COST_UNLISTED, so a new file
# runs before the quick ones even before it is measured.
COST_S = {"test_torch_baselines.py": 110, "test_gguf.py": 88, "test_bench.py": 87, "test_sharding.py": 62,
          "test_launch.py": 46, "test_cli.py": 45, "test_serve.py": 42, "test_engine.py": 38, "test_multihost.py": 35,
          "test_quality.py": 22, "test_train.py": 20, "test_quant_gemv.py": 20, "test_quantize.py": 20,
          "test_export.py": 20, "test_decode_kernel.py": 17, "test_distill.py": 17, "test_plan_data.py": 16,
          "test_slots.py": 11, "test_model.py": 8, "test_weights.py": 4, "test_torch_quantize.py": 3,
          "test_layers.py": 3, "test_tokenizer.py": 2, "test_plan_config.py": 1, "test_no_torch.py": 1}
COST_UNLISTED = 40


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -COST_S.get(item.path.name, COST_UNLISTED))  # stable: a file's own order is kept


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Lazily built HF checkpoints by config name: `checkpoints(name)` -> (directory, torch model)."""
    cache = {}

    def get(name: str, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(name)
            cache[key] = (d, make_checkpoint(d, name, **kwargs))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def engines(checkpoints):
    """Cached float32 engines: `engines(name, lp="", devices=1)`."""
    from lpjax.engine import Engine

    cache = {}

    def get(name: str, lp: str = "", devices: int = 1):
        key = (name, lp, devices)
        if key not in cache:
            base = next((e for (n, _, d), e in cache.items() if n == name and d == devices), None)
            cache[key] = base.with_plan(lp) if base else Engine.load(str(checkpoints(name)[0]), lp, devices, "float32")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(CORPUS * 3)
    return p


# the command-line tools by the module `python -m` runs
MAINS = {"lpjax.generate": "lpjax.generate", "lpjax.eval": "lpjax.eval", "lpjax.sweep": "lpjax.sweep",
         "lpjax.plan": "lpjax.plan.__main__", "lpjax.convert": "lpjax.convert.__main__", "convert": "convert.__main__",
         "lpjax.serve": "lpjax.serve"}
DEVICE_FLAG = ("lpjax.generate", "lpjax.eval", "lpjax.sweep", "lpjax.plan", "lpjax.serve")


@pytest.fixture
def run_main(capsys, monkeypatch):
    """`run_main(module, *args, devices=1, stdin=None)` -> (exit code, stdout, stderr): the command line
    `python -m module ARGS` run in this process, through `cli.run` as the module's `__main__` runs it (exit code 2
    and one line for bad input), without a JAX start-up of its own. This process sees 8 devices, so `--devices N`
    stands in for a process that sees N (unless ARGS give --devices)."""
    import importlib
    import io

    from lpjax import cli

    def run(module: str, *args, devices: int = 1, stdin: str | None = None):
        argv = [str(a) for a in args]
        if module in DEVICE_FLAG and "--devices" not in argv:
            argv += ["--devices", str(devices)]
        main = importlib.import_module(MAINS[module]).main
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.run(main, argv)
        out, err = capsys.readouterr()
        return e.value.code, out, err

    return run
