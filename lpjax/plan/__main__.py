"""`python -m lpjax.plan`: search the Δ/2 disjoint pairs of consecutive layers that cost the least perplexity.

The search itself, and how it scores plans, is lpjax/quality/search.py (its docstring is this command's epilog).
"""

from __future__ import annotations

import argparse
import sys
import time

from lpjax import cli, launch
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan, parse_deltas
from lpjax.quality import search as search_lib
from lpjax.quality.perplexity import DEFAULT_WINDOW, encode_texts, resolve_window
from lpjax.quality.search import SearchSpace, Step, format_result, method_name, plan_perplexity, scoring, search


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lpjax.plan", description=__doc__.split("\n\n")[0],
                                epilog=search_lib.__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    next(a for a in p._actions if a.dest == "lp").help = argparse.SUPPRESS  # the search finds the plan
    p.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text file(s) to score (required)")
    p.add_argument("--delta", type=str, default=None, help="number of layers to pair (even, > 0; required)")
    p.add_argument("--beam", type=int, default=1, help="partial plans kept per step (1 = greedy, the default)")
    p.add_argument("--exclude-first", type=int, default=1, help="first layers never paired (default 1)")
    p.add_argument("--exclude-last", type=int, default=1, help="last layers never paired (default 1)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="score every plan on the texts' first N tokens (default 4096; 0 = all)")
    p.add_argument("--window", type=int, default=None,
                   help=f"tokens per window (default: --max-len, else min(model context, {DEFAULT_WINDOW}), "
                        "no longer than the longest scored text)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window / 2)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    return p.parse_args(argv)


def parse_delta(text: str | None) -> int:
    if text is None:
        raise LPJaxError("--delta: give the number of layers to pair, e.g. --delta 8")
    deltas = parse_deltas(text)
    if len(deltas) != 1:
        raise LPJaxError(f"--delta {text}: expected one even number of layers, e.g. 8")
    return deltas[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    contents = cli.read_texts(args.text)
    delta = parse_delta(args.delta)
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--max-tokens", args.max_tokens, 0),
                               ("--beam", args.beam, 1)):
        if value < least:
            raise LPJaxError(f"{flag} {value}: must be at least {least}")
    if args.lp:
        raise LPJaxError("--lp: the search finds the plan itself; give --delta instead")
    quantize = cli.quantize_spec(args)
    if (code := launch.start(args, "lpjax.plan", argv)) is not None:
        return code  # this process launched per-device workers, which ran the tool
    from lpjax.engine import Engine
    from lpjax.sources import open_source

    space = SearchSpace(open_source(args.model).config.n_layers, args.exclude_first, args.exclude_last)
    space.check(delta)  # before any weight is read
    main_process = cli.is_main_process()
    engine = Engine.load(args.model, "", args.devices, args.dtype, progress=cli.load_bar() if main_process else None,
                         quantize=quantize, quant_kernel=args.quant_kernel, attention=args.attention)
    texts = encode_texts(engine.tokenizer, args.text, contents, args.max_tokens)
    window, stride = resolve_window(args.window, args.stride, args.max_len, engine.config.max_seq_len)
    if window > max(map(len, texts)):  # same scores, less padding: no text fills the window
        window = max(map(len, texts))
        stride = min(stride, window - 1)
    tokens = sum(len(t) - 1 for t in texts)
    cli.say(f"[{engine.describe()}]", file=sys.stderr)
    cli.say(f"[search for Δ={delta}: {method_name(args.beam)} over {space.describe()}; each plan scored by "
            f"perplexity on {tokens} tokens (--max-tokens {args.max_tokens}), windows of {window}, stride {stride}, "
            f"by {scoring(engine)}]", file=sys.stderr)

    def on_step(s: Step):
        v, p = s.kept[0]
        cli.say(f"step {s.size} of {delta // 2}: scored {s.scored} plan(s) of {s.size} pair(s); best "
                f"{LPPlan(space.n_layers, p).spec()} ppl {v:.4f}", file=sys.stderr)

    started = time.perf_counter()
    score = plan_perplexity(engine, texts, window, stride, args.batch_size)
    res = search(space, delta, score, args.beam, on_step)
    res.update(seconds=round(time.perf_counter() - started, 1), tokens=tokens, window=window, stride=stride,
               model=engine.source.description, devices=engine.layout.n_devices, n_layers=space.n_layers,
               scoring=scoring(engine))
    cli.say(format_result(res))
    if args.json:
        cli.emit_json(res)
    return 0


if __name__ == "__main__":
    cli.run(main)
