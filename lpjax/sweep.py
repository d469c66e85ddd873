"""`python -m lpjax.sweep`: perplexity and measured decode time of many LP plans (the paper's Figure 1).

Plans: for each Δ of `--delta` the default range, Δ layers ending two before the last (`LPPlan.ending_before_last`);
with `--position` also every range of that Δ starting at 0, STEP, 2*STEP, ... (`--position-step`, default 2); with
`--lp` one more plan of your own (for instance a `python -m lpjax.plan` result). The sequential model is always
included: it is the reference of the Δppl and speed-up columns. The weights are opened once; each plan re-stacks
them (`Engine.with_plan`), which costs a re-read and a compile per plan, never a conversion.

Perplexity is `lpjax.eval`'s (same windows, same scoring) over all `--text` files. Decode time is measured on the
devices in use: batch 1, a prompt of the first `--prompt-tokens` tokens of the first text, `--new-tokens` new tokens
with EOS ignored, one on-device loop; one warm-up generation of the same shape, then the median ms/token of
`--repeats` generations. Timings exclude compilation.

Output: a table on stdout; with `--out DIR` also DIR/sweep.txt (the table), DIR/sweep.json (every record) and
DIR/sweep.png (perplexity against decode ms/token, one point per plan, the Pareto front joined). Existing files
there are only replaced with `--overwrite`. `--json` ends stdout with the same JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from lpjax import cli, launch
from lpjax.errors import LPJaxError
from lpjax.plan import parse_deltas
from lpjax.quality.perplexity import DEFAULT_WINDOW, encode_texts, resolve_window
from lpjax.quality.sweep import OUT_FILES, Timing, finish, format_table, measure, plot, sweep_plans


def check_out(out: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, to replace a user's files (only the sweep's own file names are ever written)."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise LPJaxError(f"--out {out}: exists and is not a directory")
    existing = [f for f in OUT_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise LPJaxError(f"--out {out}: {', '.join(existing)} already there (pass --overwrite to replace)")


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lpjax.sweep", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    next(a for a in p._actions if a.dest == "lp").help = "one more plan to sweep, e.g. a `python -m lpjax.plan` result"
    p.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text file(s) to score (required)")
    p.add_argument("--delta", default=None,
                   help="comma-separated Δ values (even); default: every Δ of the default range, 0 to layers-2")
    p.add_argument("--position", action="store_true", help="also sweep the start of each Δ>0 range")
    p.add_argument("--position-step", type=int, default=2, help="layers between swept range starts (default 2)")
    p.add_argument("--window", type=int, default=None,
                   help=f"tokens per window (default: --max-len, else min(model context, {DEFAULT_WINDOW}))")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window / 2)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the texts' first N tokens (0: all)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of the decode timing (default 16)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timing run (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per plan, median reported (default 3)")
    p.add_argument("--out", type=Path, default=None, help="directory for sweep.txt, sweep.json and sweep.png")
    p.add_argument("--overwrite", action="store_true", help="replace sweep.* files already in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    contents = cli.read_texts(args.text)
    check_out(args.out, args.overwrite)
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--prompt-tokens", args.prompt_tokens, 1),
                               ("--new-tokens", args.new_tokens, 2), ("--repeats", args.repeats, 1),
                               ("--max-tokens", args.max_tokens, 0)):
        if value < least:
            raise LPJaxError(f"{flag} {value}: must be at least {least}")
    quantize = cli.quantize_spec(args)
    if (code := launch.start(args, "lpjax.sweep", argv)) is not None:
        return code  # this process launched per-device workers, which ran the tool
    from lpjax.engine import Engine
    from lpjax.sources import open_source

    n_layers = open_source(args.model).config.n_layers  # plans are checked before any weight is read
    deltas = parse_deltas(args.delta) if args.delta is not None else list(range(0, n_layers - 1, 2))
    plans = sweep_plans(n_layers, deltas, args.position, args.position_step, args.lp)
    main_process = cli.is_main_process()
    base = Engine.load(args.model, "", args.devices, args.dtype, progress=cli.load_bar() if main_process else None,
                       quantize=quantize, quant_kernel=args.quant_kernel, attention=args.attention)
    window, stride = resolve_window(args.window, args.stride, args.max_len, base.config.max_seq_len)
    texts = encode_texts(base.tokenizer, args.text, contents, args.max_tokens)
    prompt = texts[0][: args.prompt_tokens]
    timing = Timing(len(prompt), args.new_tokens, args.repeats)
    limit = args.max_len or base.config.max_seq_len
    if len(prompt) + timing.new_tokens > limit:  # fail now, not after the first plan's perplexity
        raise LPJaxError(f"--new-tokens {timing.new_tokens}: after the {len(prompt)}-token timing prompt, does not "
                         f"fit the context of {limit} tokens")
    cli.say(f"[{base.describe()}]", file=sys.stderr)
    cli.say(f"[sweep: {len(plans)} plan(s); perplexity over {sum(map(len, texts))} tokens in windows of {window}, "
            f"stride {stride}; {timing.describe()}]", file=sys.stderr)
    if args.out is not None and main_process:
        args.out.mkdir(parents=True, exist_ok=True)
    header = {
        "model": base.source.description, "n_layers": n_layers, "dtype": base.dtype_name,
        "quantize": None if base.quantize is None else str(base.quantize),
        "devices": base.layout.n_devices, "platform": base.mesh.devices.flat[0].platform,
        "mesh": {"pair": base.layout.pair_size, "tp": base.layout.tp_size}, "window": window, "stride": stride,
        "texts": list(args.text), "timing": dict(dataclasses.asdict(timing), statistic="median", warmup_runs=1,
                                                  batch=1, eos="ignored", compile="excluded"),
    }
    records: list[dict] = []
    started = time.perf_counter()
    for i, sp in enumerate(plans, 1):
        cli.say(f"plan {i} of {len(plans)}: {sp.plan.describe()} [{sp.kind}]", file=sys.stderr)
        engine = base if sp.plan == base.plan else base.with_plan(sp.plan)
        bar = cli.progress_bar(f"  plan {i}/{len(plans)} scoring windows") if main_process else None
        record = measure(engine, sp, texts, window, stride, args.batch_size, prompt, timing, args.max_len, bar)
        records.append(record)
        cli.say(f"  ppl {record['ppl']:.4f}, accuracy {record['accuracy']:.4f}, "
                f"decode {record['ms_per_token']:.3f} ms/token", file=sys.stderr)
        del engine
        if args.out is not None and main_process:  # partial results survive an interrupted sweep
            write_json(args.out / "sweep.json", dict(header, records=records, complete=False))
    records = finish(records)
    result = dict(header, records=records, complete=True, seconds=round(time.perf_counter() - started, 1))
    table = format_table(records)
    note = (f"perplexity: {records[0]['tokens']} scored tokens of {len(args.text)} file(s), windows of {window}, "
            f"stride {stride}\n{timing.describe()}, on {base.layout.n_devices} "
            f"{header['platform'].upper()} device(s)\nfront: * = on the Pareto front (no plan has both lower "
            "perplexity and lower ms/token)")
    cli.say(f"{table}\n{note}")
    if args.out is not None and main_process:
        (args.out / "sweep.txt").write_text(f"{base.describe()}\n{table}\n{note}\n")
        write_json(args.out / "sweep.json", result)
        plot(records, args.out / "sweep.png", f"{base.source.description}: LP plans, {base.dtype_name}, "
             f"{base.layout.n_devices} {header['platform'].upper()} device(s)",
             f"decode ms/token (batch 1, {timing.new_tokens} new tokens, median of {timing.repeats})",
             f"perplexity ({records[0]['tokens']} tokens, window {window})")
        cli.say(f"wrote {args.out / 'sweep.txt'}, {args.out / 'sweep.json'}, {args.out / 'sweep.png'}",
                file=sys.stderr)
    if args.json:
        cli.emit_json(result)
    return 0


if __name__ == "__main__":
    cli.run(main)
