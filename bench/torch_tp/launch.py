"""The ranks: one process per GPU (spawned with torch.multiprocessing; a job of one rank runs in this process), joined
by torch.distributed (NCCL on CUDA, gloo on CPU), each running a job's rank function on its shard of the model. CPU
ranks are forked when this process runs torch on one thread (see `start_method`)."""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import DEFAULT_METRICS
from bench.records import DECODE_TOKENS
from bench.torch_tp.context import sync, torch_dtype
from bench.torch_tp.model import HFState, RankModel, build_rank_model
from bench.torch_tp.quantize import Quantization
from lpjax.config import ModelConfig
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan

IMPL = "torch-tp-cudagraph"


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a rank needs (picklable: sent to spawned processes)."""

    model: str  # record name
    config: ModelConfig
    directory: str | None
    world: int
    device: str
    dtype: str
    plans: tuple[LPPlan, ...]
    seed: int = 0
    batches: tuple[int, ...] = (1,)
    metrics: tuple[str, ...] = DEFAULT_METRICS
    repeats: int = 5
    long_repeats: int = 1
    json_out: str | None = None
    cuda_graph: bool = True
    impl: str = IMPL
    compile_mode: str | None = None  # torch.compile mode of prefill and the decode step (None: eager)
    quantization: Quantization | None = None  # None: weights in the compute dtype
    decode_tokens: int = DECODE_TOKENS  # decode steps each decode figure times
    tokens: tuple[tuple[int, ...], ...] = ()  # check: the prompt rows
    new_tokens: int = 0  # check: greedy tokens to generate through the cached path
    result_path: str | None = None  # check: where rank 0 saves its result


RankMain = Callable[[int, Job], None]  # a module-level function (spawned ranks import it by name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: Job, rank_main: RankMain) -> None:
    """`rank_main(rank, job)` on job.world ranks: in this process for one, else one spawned process per rank (their
    environment is set here for the spawn and restored after)."""
    if job.world == 1:
        _run_rank(0, job, rank_main)
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           # NVLink SHARP (multicast) stays off on the GPU machines unless the caller chose otherwise
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.start_processes(_worker, args=(job, rank_main), nprocs=job.world, join=True,
                           start_method=start_method(job))
    except mp.ProcessRaisedException as e:
        text = str(e).strip()
        print(text, file=sys.stderr)
        # the rank's traceback ends with its exception's own line
        raise LPJaxError(f"a rank failed: {text.splitlines()[-1] if text else e.__class__.__name__}") from None
    except mp.ProcessExitedException as e:
        raise LPJaxError(f"a rank exited early ({e})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_method(job: Job) -> str:
    """How the ranks start: spawned (a fresh interpreter that imports torch and lpjax again, ~4 s of CPU a rank), or
    forked from this process, which has them imported (a CPU test's gloo ranks then start in milliseconds). Forked
    only on CPU (CUDA cannot be used in a forked child) and when this process runs torch on one thread: a child forked
    after OpenMP ran a team of threads here hangs at its own first parallel region (GNU OpenMP is not fork-safe)."""
    return "fork" if job.device == "cpu" and torch.get_num_threads() == 1 else "spawn"


def _worker(rank: int, job: Job, rank_main: RankMain) -> None:
    if "torch._dynamo" in sys.modules:  # a forked rank: it compiles its own programs, not on this process's cache
        torch._dynamo.reset()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.world))
    _run_rank(rank, job, rank_main)


def _run_rank(rank: int, job: Job, rank_main: RankMain) -> None:
    cuda = job.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    if job.world > 1:
        kwargs = {"device_id": torch.device("cuda", rank)} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=job.world, **kwargs)
    try:
        with torch.inference_mode():
            if job.world > 1:  # communicators up before anything is timed or captured
                warm = torch.ones(1, device=job.device)
                dist.all_reduce(warm)
                sync(job.device)
            rank_main(rank, job)
    finally:
        if job.world > 1:
            gc.collect()  # graphs that captured collectives go before the communicator
            sync(job.device)
            dist.destroy_process_group()


def build(job: Job, rank: int, plan: LPPlan) -> RankModel:
    """This rank's shard of the job's model under `plan`."""
    state = HFState(Path(job.directory)) if job.directory else None
    device = job.device if job.device == "cpu" else torch.device("cuda", rank)
    return build_rank_model(job.config, plan, rank, job.world, device, torch_dtype(job.dtype), state, job.seed,
                            job.compile_mode, job.quantization)
