"""`python -m convert --hf DIR | --model FILE.gguf --out DIR [--dtype D] [--overwrite]`: HF Llama or GGUF file ->
lpjax Orbax checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpjax import cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=Path, help="Hugging Face Llama directory (config.json + safetensors)")
    src.add_argument("--model", type=Path, help="the same, or a GGUF file (dequantised), or smollm2")
    p.add_argument("--out", required=True, type=Path, help="output directory (must be new or empty)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                   help="stored dtype (default: as in the HF checkpoint; float32 for GGUF)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing lpjax checkpoint at --out")
    args = p.parse_args(argv)
    from convert import convert

    config = convert(args.hf or args.model, args.out, args.dtype, args.overwrite)
    print(f"wrote {args.out}: {config.n_layers} layers, {config.n_params / 1e6:.1f}M parameters; "
          f"load it with --model {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
