"""Test session set-up: 8 forced CPU devices (so sharding is tested without GPUs), offline HF, tiny checkpoints."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
if "LPJAX_COMPILE_CACHE" not in os.environ:  # keep the CLIs' compile cache out of the user's home
    import tempfile

    os.environ["LPJAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="lpjax-test-xla-")
if "LPJAX_GGUF_CACHE" not in os.environ:  # GGUF companion directories (tokenizer files) too
    import tempfile

    os.environ["LPJAX_GGUF_CACHE"] = tempfile.mkdtemp(prefix="lpjax-test-gguf-")

import pytest  # noqa: E402
from helpers import CORPUS, make_checkpoint  # noqa: E402


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
