"""`python -m lpjax.finetune.corpus`: a training text the model writes itself, for fine-tuning without labelled text.

The teacher is the model run sequentially. It samples replies at temperature 1, on the device, to a list of varied
short prompts (`--prompts builtin`, the default: ~50 shipped ones; or a file of one prompt a line), in the chat
template when the checkpoint has one, until `--tokens` new tokens are written. OUT gets the text (each prompt and
its reply, blank lines between samples) and OUT's `.json` sidecar the model, seed, prompt list and sizes: the same
command writes the same text again on the same platform and dtype. Train on it with `python -m lpjax.finetune
--text OUT [--distill]`; the run records that the text was teacher-written and from which seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lpjax import cli
from lpjax.errors import LPJaxError
from lpjax.training.corpus import BUILTIN, CorpusSpec, read_prompts, sidecar, sidecar_path, write_text


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lpjax.finetune.corpus", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True,
                   help="the teacher: HF Llama directory, converted lpjax directory, GGUF file or smollm2 (it runs "
                        "sequentially, whatever plan it was fine-tuned for)")
    p.add_argument("--prompts", default=BUILTIN, metavar="FILE|builtin",
                   help="prompts, one a line (default: builtin, the shipped list of varied short prompts)")
    p.add_argument("--tokens", type=int, required=True, help="new tokens to write (whole samples: a few more)")
    p.add_argument("--seed", type=int, default=0, help="the prompts' order and the sampling (default 0)")
    p.add_argument("--out", required=True, type=Path, help="the text file to write (its sidecar: OUT with .json)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="replies sampled together (default 8)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="float32",
                   help="the teacher's weights and compute (default float32)")
    p.add_argument("--devices", type=int, default=None, help="devices to use (default: all visible)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and its sidecar if they exist")
    p.add_argument("--json", action="store_true", help="end stdout with the sidecar as one JSON line")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.enable_compile_cache()
    out: Path = args.out
    side = sidecar_path(out)
    if side == out:
        raise LPJaxError(f"--out {out}: the sidecar would be the text file itself; give the text another suffix")
    if args.model.startswith("random:"):
        raise LPJaxError(f"--model {args.model}: a teacher needs trained weights, not random ones")
    spec = CorpusSpec(model=args.model, prompts=read_prompts(args.prompts), prompts_from=args.prompts,
                      tokens=args.tokens, seed=args.seed, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, dtype=args.dtype)
    spec.check()
    for path in (out, side):
        if path.exists() and not args.overwrite:
            raise LPJaxError(f"--out {out}: {path} already exists (pass --overwrite to replace it)")
        if path.is_dir():
            raise LPJaxError(f"--out {out}: {path} is a directory")
    if not out.parent.is_dir():
        raise LPJaxError(f"--out {out}: no such directory {out.parent}")
    from lpjax.engine import Engine

    engine = Engine.load(args.model, "", args.devices, args.dtype,
                         progress=cli.load_bar() if cli.is_main_process() else None)
    cli.say(f"[teacher: {engine.describe()}; {len(spec.prompts)} prompts ({args.prompts}), {spec.tokens:,} tokens, "
            f"seed {spec.seed}, temperature {spec.temperature:g}]", file=sys.stderr)
    bar = cli.progress_bar("writing tokens") if cli.is_main_process() else None
    corpus = write_text(engine, spec, bar)
    meta = sidecar(spec, corpus, out, engine)
    out.write_text(corpus.text, encoding="utf-8")
    side.write_text(json.dumps(meta, indent=2) + "\n")
    to = sys.stderr if args.json else sys.stdout
    cli.say(f"wrote {out}: {corpus.samples} samples, {corpus.generated_tokens:,} new tokens, "
            f"{len(corpus.text):,} characters ({'chat template' if corpus.chat else 'plain prompts'}); "
            f"spec and seed in {side}", file=to)
    if args.json:
        cli.emit_json(meta)
    return 0


if __name__ == "__main__":
    cli.run(main)
