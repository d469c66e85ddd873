"""Correctness of the PyTorch LP model: full-sequence logits for the tests, and the cached greedy path (prefill,
decode steps, CUDA-graph replays on a GPU) against the argmax of the full forward over the same sequence (eager)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from bench.common import resolve_model
from bench.torch_tp.context import check_device, default_dtype, prompt_tokens
from bench.torch_tp.decoder import Decoder, continue_greedy, prefill, run_prefill
from bench.torch_tp.launch import Job, build, launch
from bench.torch_tp.model import check_layout, check_quantization
from bench.torch_tp.quantize import Quantization
from lpjax.config import round_up
from lpjax.engine import CACHE_MULTIPLE
from lpjax.plan import LPPlan

Tensor = torch.Tensor


def _check_rank(rank: int, job: Job) -> None:
    results = []
    tokens = torch.tensor(job.tokens, dtype=torch.long, device=job.device if job.device == "cpu" else "cuda")
    for plan in job.plans:
        m = build(job, rank, plan)
        if not job.new_tokens:
            results.append({"lp": plan.spec(), "logits": run_prefill(m, tokens, last_only=False).cpu()})
            continue
        T, n = tokens.shape[1], job.new_tokens
        dec = Decoder(m, tokens.shape[0], round_up(T + n, CACHE_MULTIPLE), job.cuda_graph)
        # the logits come from the very prefill the greedy steps continue from (its cache written): a compiled
        # model compiles one prefill program, not one with a cache and one without
        logits = run_prefill(m, tokens, dec.cache, last_only=False)
        new = continue_greedy(dec, logits[:, -1].argmax(dim=-1), T, n)
        # the same sequence through the full forward, eager: its argmax at each position must be the next new
        # token. A compiled model's cached path is checked against the plain model, and no program is compiled for
        # this one more sequence length (inductor compiles each static shape anew)
        full = prefill(m, torch.cat([tokens, new[:, :-1]], dim=1), last_only=False)[:, T - 1:]
        top, low = full.max(dim=-1).values, full.min(dim=-1).values
        gap = (top - full.gather(-1, new[..., None])[..., 0]) / (top - low)  # 0 where the choices agree
        results.append({"lp": plan.spec(), "logits": logits.cpu(), "generated": new.cpu(),
                        "full_argmax": full.argmax(dim=-1).cpu(), "gap": gap.cpu()})
        del m, dec
    if rank == 0:
        torch.save(results, job.result_path)


def check(model: str, tokens, lps: tuple[str, ...] | list[str] = ("",), world: int = 1, new_tokens: int = 0,
          device: str = "cpu", dtype: str | None = None, seed: int = 0, cuda_graph: bool = True,
          compile_mode: str | None = None, quantization: Quantization | None = None) -> list[dict]:
    """For each plan: the full-sequence float32 logits [B, T, V] of `tokens` on `world` ranks and, with
    new_tokens, the greedy tokens of the cached path (prefill + decode steps; graph replays on CUDA) with the
    argmax of the full forward over the same sequence (the logits are then the prefill's that wrote the cache).
    `model`: a preset name or an HF checkpoint directory; `quantization`: its products quantized."""
    name, config, directory = resolve_model(str(model))
    check_device(device, world)
    plans = tuple(LPPlan.parse(lp, config.n_layers) for lp in lps)
    for plan in plans:
        check_layout(config, plan, world)
        check_quantization(config, plan, world, quantization)
    rows = tuple(tuple(int(t) for t in row) for row in (tokens.tolist() if hasattr(tokens, "tolist") else tokens))
    with tempfile.TemporaryDirectory(prefix="torch-tp-check-") as tmp:
        job = Job(name, config, str(directory) if directory else None, world, device, default_dtype(device, dtype),
                  plans, seed, tokens=rows, new_tokens=new_tokens, result_path=os.path.join(tmp, "result.pt"),
                  cuda_graph=cuda_graph, compile_mode=compile_mode, quantization=quantization)
        launch(job, _check_rank)
        return torch.load(job.result_path)


def full_logits(model: str, tokens, lp: str = "", world: int = 1, device: str = "cpu",
                dtype: str | None = None) -> Tensor:
    """Full-sequence float32 logits [B, T, V] of the tensor-parallel LP model."""
    return check(model, tokens, (lp,), world, 0, device, dtype)[0]["logits"]


def check_cli(name: str, args: argparse.Namespace, plans: list[LPPlan], quantization: Quantization | None) -> int:
    """`--check`: greedy tokens of the cached path against the full forward over the same sequence, one JSON line a
    plan. In float32 they must agree exactly; in bf16 random weights leave near-ties, so a token may differ, but the
    full forward must rate it within 5% of its logit range of the best (a broken cache or graph picks tokens rated
    like any other)."""
    config = resolve_model(args.model)[1]
    tokens = prompt_tokens(32, 2, config).tolist()
    results = check(args.model, tokens, [p.spec() for p in plans], args.devices, 16, args.device, args.dtype,
                    args.seed, not args.no_cuda_graph, args.compile, quantization)
    exact = default_dtype(args.device, args.dtype) == "float32"
    ok = True
    for plan, r in zip(plans, results):
        agree = float((r["generated"] == r["full_argmax"]).float().mean())
        gap = float(r["gap"].max())
        good = agree == 1.0 if exact else gap <= 0.05
        ok &= good
        print(json.dumps({"check": "cached greedy decode vs full-forward argmax", "impl": args.impl_name, "model": name,
                          "gpus": args.devices, "lp": plan.spec(), "lp_delta": plan.delta, "device": args.device,
                          "quantize": quantization.mode if quantization else None,
                          "agreement": round(agree, 4), "max_gap": round(gap, 4), "ok": good}), flush=True)
    return 0 if ok else 1
