"""What the PyTorch runners (this package and `bench.hf_baselines`) share: the device checks, dtypes, the benchmark
prompt as a tensor, and the records with PyTorch's context (versions, device name)."""

from __future__ import annotations

import argparse
import gc
import os
import platform

import torch

from bench import common, records
from lpjax.config import ModelConfig
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` name (`lpjax.weights.DTYPES`)."""
    return getattr(torch, name)


def default_dtype(device: str, dtype: str | None) -> str:
    """`--dtype`, else bfloat16 on CUDA and float32 on CPU."""
    return dtype or ("bfloat16" if device == "cuda" else "float32")


def check_device(device: str, n: int) -> None:
    if n < 1:
        raise LPJaxError(f"--devices {n}: need at least one")
    if device == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < n:
            raise LPJaxError(f"--devices {n}: only {visible} CUDA GPU(s) are visible")


def prompt_tokens(n: int, batch: int, config: ModelConfig, device="cpu") -> torch.Tensor:
    """The benchmark prompt (`common.model_prompt`) as token ids [batch, n], every row the same."""
    return torch.tensor([common.model_prompt(n, config)] * batch, dtype=torch.long, device=device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    """Memory of the previous configuration released, and the peak counter reset for the next."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def versions(device: str, **extra: str) -> dict:
    v = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if device == "cuda":
        try:
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError, TypeError):
            pass
    return v | extra


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def make_record(impl: str, model: str, gpus: int, plan: LPPlan, batch: int, metric: str, samples: list[float],
                device: str, **extra) -> dict:
    """The harness's record (`bench.records.make`) with the PyTorch context: versions, device."""
    return records.make(impl, model, gpus, plan.delta, plan.spec(), batch, metric, samples,
                        versions=versions(device, **extra.pop("versions", {})), device_name=device_name(device),
                        device=device, **extra)


def add_torch_args(p: argparse.ArgumentParser) -> None:
    """The flags of the PyTorch runners beyond `common.add_runner_args`."""
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo ranks, for the tests")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
