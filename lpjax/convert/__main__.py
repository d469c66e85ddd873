"""`python -m lpjax.convert (--model SRC | --hf DIR) --out DIR [--format lpjax|hf] [--dtype D] [--quantize Q
[--group-size G]] [--overwrite]`.

`--format lpjax` (the default) writes lpjax's converted format (an Orbax checkpoint per layer); `--format hf` writes
a Hugging Face Llama directory (safetensors, config.json, tokenizer files) that transformers loads. SRC is anything
lpjax loads: an HF directory, an lpjax directory (a trained or fine-tuned model), a GGUF file (dequantised; float32
unless --dtype says otherwise) or smollm2, or random:NAME. `--quantize` writes an lpjax checkpoint with quantized
matrices (int8, int4, or a GGUF file's own blocks), which every tool then loads quantized.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lpjax import cli
from lpjax.errors import LPJaxError
from lpjax.export import FORMATS
from lpjax.weights import DTYPES


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lpjax.convert", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="HF Llama directory, lpjax directory, GGUF file, smollm2, or random:NAME")
    src.add_argument("--hf", type=Path, default=None, help="Hugging Face Llama directory (config.json + safetensors)")
    p.add_argument("--out", required=True, type=Path, help="output directory (must be new or empty)")
    p.add_argument("--format", choices=FORMATS, default="lpjax", help="lpjax (default) or hf")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="stored dtype (default: as in the source)")
    cli.add_quantize_args(p, kernel=False)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier lpjax checkpoint or export at --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quantize = cli.quantize_spec(args)
    cli.enable_compile_cache()
    from lpjax.convert import convert_model
    from lpjax.sources import open_source
    from lpjax.sources.hf import HFSource

    if args.hf is None and args.model is None:
        raise LPJaxError("give the model to convert: --model SRC (or --hf DIR)")
    if args.hf is not None and not args.hf.is_dir():
        raise LPJaxError(f"--hf {args.hf}: no such directory")
    source = HFSource(args.hf) if args.hf is not None else open_source(args.model, quantize=quantize)
    bar = cli.progress_bar(f"writing {source.config.n_layers} layers")
    config, note = convert_model(source, args.out, args.dtype, args.overwrite, args.format, bar, quantize)
    what = "a Hugging Face Llama directory" if args.format == "hf" else "an lpjax checkpoint"
    print(f"wrote {args.out} ({what}): {config.n_layers} layers, {config.n_params / 1e6:.1f}M parameters; "
          f"load it with --model {args.out}")
    if note:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    cli.run(main)
