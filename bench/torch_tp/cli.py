"""`python -m bench.torch_tp`: the command line of the PyTorch LP baselines (`torch-tp`, and `torch-compile` with
`--compile`); the package docstring says what they are."""

from __future__ import annotations

import argparse

from bench import common
from bench.records import COMPILE_MODES
from bench.torch_tp.check import check_cli
from bench.torch_tp.context import add_torch_args, check_device, default_dtype
from bench.torch_tp.launch import IMPL, Job, launch
from bench.torch_tp.measure import bench_rank
from bench.torch_tp.model import check_layout, check_quantization
from bench.torch_tp.quantize import INT4_GROUP_SIZES, Quantization

QUANTIZE_HELP = ("int8 stores each layer product (fused qkv, o, fused gate/up, down) and the LM head as int8 with a "
                 "scale per output channel, run as F.linear(x, w.to(x.dtype)) * scales (gpt-fast's int8); int4 stores "
                 "the layer products in groups of --group-size inputs with a scale and zero each, run by torch's "
                 f"int4pack kernel (groups of {', '.join(map(str, INT4_GROUP_SIZES))}), and keeps the LM head in the "
                 "compute dtype. Embedding, norms and KV cache stay in the compute dtype; each rank quantizes its own "
                 "shard; with --compile, inductor's coordinate-descent tuning is on (it fuses the int8 convert into "
                 "the decode GEMV)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import bench.torch_tp as package

    p = argparse.ArgumentParser(prog="python -m bench.torch_tp", description=package.__doc__.splitlines()[0])
    common.add_runner_args(p, "ranks: GPUs (or gloo processes with --device cpu)")
    add_torch_args(p)
    common.add_quantize_args(p, QUANTIZE_HELP)
    p.add_argument("--impl-name", default=IMPL, help=f"impl in the records (default {IMPL})")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help=f"torch.compile prefill and the decode step (inductor, fullgraph; "
                        f"{' or '.join(COMPILE_MODES)}); the compiled step is still captured in the CUDA graph")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode eagerly on CUDA (a fallback; records say cuda_graph: false)")
    p.add_argument("--check", action="store_true",
                   help="instead of timing: greedy tokens of the cached (graph) path vs the full forward's argmax")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name, config, directory = common.resolve_model(args.model)
    check_device(args.device, args.devices)
    common.check_json_out(args.json_out)
    common.check_counts(args)
    plans = common.runner_plans(args, config)
    group = common.quantize_group(args)
    quantization = Quantization(args.quantize, group) if args.quantize else None
    for plan in plans:
        check_layout(config, plan, args.devices)
        check_quantization(config, plan, args.devices, quantization)
    if args.check:
        return check_cli(name, args, plans, quantization)
    job = Job(name, config, str(directory) if directory else None, args.devices, args.device,
              default_dtype(args.device, args.dtype), tuple(plans), args.seed,
              tuple(common.parse_ints(args.batch, "--batch", 1)), tuple(common.parse_metrics(args.metrics)),
              args.repeats, args.long_repeats, args.json_out, not args.no_cuda_graph, args.impl_name, args.compile,
              quantization, decode_tokens=args.decode_tokens)
    launch(job, bench_rank)
    return 0
