"""`python -m lpjax.eval`: perplexity of a model (with or without LP) on the user's text files.

Each file is tokenised as `tokenizer(text)["input_ids"]` (the tokenizer's default special tokens, e.g. BOS). A text
longer than the window is scored in sliding windows of `--window` tokens that start `--stride` tokens apart: each
window scores only the tokens no earlier window scored, each predicted from everything before it inside its window.
So every token after the text's first is scored exactly once, with at least `window - stride` tokens of context
(except near the start). PPL = exp(total NLL / scored tokens), over all files.
"""

from __future__ import annotations

import argparse
import sys

from lpjax import cli, launch
from lpjax.errors import LPJaxError
from lpjax.quality.perplexity import DEFAULT_WINDOW, encode_texts, perplexity, resolve_window


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lpjax.eval", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    cli.add_model_args(p)
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s) to score")
    p.add_argument("--window", type=int, default=None,
                   help=f"tokens per window (default: --max-len, else min(model context, {DEFAULT_WINDOW}))")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window / 2)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="score only the texts' first N tokens (0: all), as lpjax.sweep does")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quantize = cli.quantize_spec(args)
    if (code := launch.start(args, "lpjax.eval", argv)) is not None:
        return code  # this process launched per-device workers, which ran the tool
    from lpjax.engine import Engine

    contents = [cli.read_text_file(f) for f in args.text]
    engine = Engine.load(args.model, args.lp, args.devices, args.dtype,
                         progress=cli.load_bar() if cli.is_main_process() else None, quantize=quantize,
                         quant_kernel=args.quant_kernel, attention=args.attention)
    window, stride = resolve_window(args.window, args.stride, args.max_len, engine.config.max_seq_len)
    if args.batch_size < 1:
        raise LPJaxError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_tokens < 0:
        raise LPJaxError(f"--max-tokens {args.max_tokens}: must be at least 0")
    texts = encode_texts(engine.tokenizer, args.text, contents, args.max_tokens)
    cli.say(f"[{engine.describe()}]", file=sys.stderr)
    bar = cli.progress_bar("scoring windows") if cli.is_main_process() else None
    res = perplexity(engine, texts, window, stride, args.batch_size, bar)
    cli.say(f"perplexity {res['ppl']:.4f} (NLL {res['nll']:.5f} nats/token, next-token accuracy "
            f"{res['accuracy']:.4f}) over {res['tokens']} tokens in "
            f"{res['windows']} window(s) of {window}, stride {stride}; LP plan {engine.plan.describe()}; "
            f"{engine.layout.n_devices} device(s)")
    if args.json:
        cli.emit_json({
            "ppl": res["ppl"], "nll": res["nll"], "accuracy": res["accuracy"], "tokens": res["tokens"],
            "windows": res["windows"], "window": window, "stride": stride, "lp": engine.plan.spec(),
            "delta": engine.plan.delta,
            "devices": engine.layout.n_devices, "dtype": engine.dtype_name, "model": engine.source.description,
            "quantize": engine.quantization, "weight_bytes": engine.weight_bytes,
            "files": [dict(r, file=f) for f, r in zip(args.text, res["per_text"])],
        })
    return 0


if __name__ == "__main__":
    cli.run(main)
