"""Tables and the fine-tuning plot of the quality experiment (`bench/quality.sh`), from its JSON outputs.

    python -m bench.quality_report RUN_DIR --out bench/results/quality
    python -m bench.quality_report RUN_DIR --out bench/results/quality-smollm2 --pretrained [--timings DIR]
    python -m bench.quality_report RUN_DIR --out bench/results/quality-smollm2 --pretrained --quantize-only

Copies the JSON results and the sweep plots into OUT, draws OUT/finetune.png (held-out perplexity against
fine-tuning steps: LP on the default range, LP on the searched plan, and the control that trains the same layers
without LP) and writes OUT/quality.md with the tables the README shows.

`--pretrained` reads `bench/quality_smollm2.sh`'s run instead (no training; the searched plan and the default range
scored on val by `lpjax.eval`). `--timings DIR` takes decode ms/token from DIR/sweep/sweep.json and
DIR/positions/sweep.json, sweeps of the same plans run elsewhere (for instance on an H200 with random weights of the
model's shape: speed does not depend on the values), in place of the run's own timings; the plots and the Pareto
front are then drawn from those, and say where they come from. The quantize stage's evaluations (RUN/quantize: each
plan and dtype with its weights dequantised, as int8, as int4 in groups, as the file's own blocks) become one more
table; `--quantize-only` writes just that one, to OUT/quantize.md, with its JSON files in OUT/quantize/.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from bench.records import tool_json
from lpjax.quality.sweep import plot

FINETUNES = (("default", "LP, default range"), ("searched", "LP, searched plan"),
             ("control", "control: same layers trained without LP"))


def load(run: Path) -> dict:
    out = {"train": tool_json(run / "train.json"), "search": tool_json(run / "search.json"),
           "sweep": json.loads((run / "sweep" / "sweep.json").read_text()),
           "positions": json.loads((run / "positions" / "sweep.json").read_text()),
           "eval": tool_json(run / "eval_sequential.json"), "finetune": {}}
    for name, _ in FINETUNES:
        if (run / f"finetune-{name}.json").is_file():
            out["finetune"][name] = tool_json(run / f"finetune-{name}.json")
    return out


def sweep_table(sweep: dict) -> str:
    """One row per plan; a next-token accuracy column when the records have it."""
    acc = all("accuracy" in r for r in sweep["records"])
    lines = ["| plan (`--lp`) | Δ | depth | val perplexity | Δ perplexity |" + (" next-token accuracy |" if acc else "")
             + " decode ms/token | speed-up |", "|---|---|---|---|---|" + ("---|" if acc else "") + "---|---|"]
    for r in sweep["records"]:
        lines.append(f"| {r['lp'] or 'sequential'} | {r['delta']} | {r['depth']} | {r['ppl']:.3f} | "
                     f"{r['delta_ppl']:+.3f} |" + (f" {r['accuracy']:.4f} |" if acc else "")
                     + f" {r['ms_per_token']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def merge_timings(records: list[dict], timings: list[dict]) -> list[dict]:
    """`records` with decode ms/token taken from `timings` (records of the same plans measured elsewhere), the
    speed-ups and the Pareto front recomputed from them."""
    from lpjax.sweep import finish

    ms = {t["lp"]: t for t in timings}
    missing = [r["lp"] or "sequential" for r in records if r["lp"] not in ms]
    if missing:
        raise ValueError(f"no timing for plan(s) {', '.join(missing)}")
    return finish([dict(r, ms_per_token=ms[r["lp"]]["ms_per_token"],
                        ms_per_token_runs=ms[r["lp"]]["ms_per_token_runs"]) for r in records])


def finetune_table(ft: dict) -> str:
    """Perplexities (non-overlapping windows of val.txt, as the training loop scores them)."""
    steps = next(iter(ft.values()))["steps"] if ft else 0
    lines = ["| run | trained layers | val ppl before | val ppl after " + f"{steps} steps |", "|---|---|---|---|"]
    for name, label in FINETUNES:
        if name in ft:
            r = ft[name]
            lines.append(f"| {label} | {r['lp']} | {r['val_ppl_before']:.3f} | {r['val_ppl_after']:.3f} |")
    return "\n".join(lines)


def plot_finetune(ft: dict, path: Path, title: str = "Fine-tuning only the paired layers (Δ=8 of 16)",
                  xlabel: str = "fine-tuning steps (32 x 256 tokens)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, label in FINETUNES:
        if name not in ft:
            continue
        r = ft[name]
        steps = [0] + [e[0] for e in r["evals"]]  # evals: [step, val loss, val accuracy] (no accuracy in some)
        ppl = [r["val_ppl_before"]] + [math.exp(e[1]) for e in r["evals"]]
        ax.plot(steps, ppl, marker="o", ms=3, label=f"{label} ({r['lp']})", ls="--" if r.get("control") else "-")
    seq = next(iter(ft.values()))["val_ppl_sequential"]
    ax.axhline(seq, color="gray", lw=1, ls=":", label=f"sequential model, not fine-tuned ({seq:.2f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PRETRAINED_FINETUNES = ("default", "control")


def load_quantize(run: Path) -> list[dict]:
    """The quantize stage's `lpjax.eval` records (RUN/quantize/*.json), in file-name order; an empty file (an
    evaluation still running) is left out."""
    records = [tool_json(f) for f in sorted((run / "quantize").glob("*.json"))]
    return [r for r in records if r is not None]


def quantize_table(records: list[dict]) -> str:
    """One row per evaluation: each plan's rows after its float32 dequantised reference, whose perplexity the
    others are compared with."""
    def order(r):
        return (r["lp"], r["dtype"] != "float32", r["quantize"] is not None, str(r["quantize"]))

    records = sorted(records, key=order)
    reference = {r["lp"]: r["ppl"] for r in records if r["quantize"] is None and r["dtype"] == "float32"}
    lines = ["| plan (`--lp`) | `--dtype` | matrices | weights (MB) | val perplexity | against float32 | "
             "next-token accuracy |", "|---|---|---|---|---|---|---|"]
    for r in records:
        q = r["quantize"]
        held = ("dequantised" if q is None else "the file's own blocks (`--quantize gguf`)" if q == "gguf"
                else f"`--quantize {q.replace(':', ' --group-size ')}`")
        cost = 100 * (r["ppl"] / reference[r["lp"]] - 1) if r["lp"] in reference else math.nan
        lines.append(f"| {r['lp'] or 'sequential'} | {r['dtype']} | {held} | {r['weight_bytes'] / 1e6:.0f} | "
                     f"{r['ppl']:.4f} | {round(cost, 2) + 0.0:+.2f}% | {r['accuracy']:.4f} |")
    return "\n".join(lines)


def load_pretrained(run: Path, timings: Path | None) -> dict:
    """`bench/quality_smollm2.sh`'s results; with `timings`, the sweeps' decode times replaced by those."""
    out = {"search": tool_json(run / "search.json"), "finetune": {},
           "eval": {name: tool_json(run / f"eval_{name}.json") for name in ("default", "searched")}}
    for sweep in ("sweep", "positions"):
        out[sweep] = json.loads((run / sweep / "sweep.json").read_text())
        if timings is not None:
            timed = json.loads((timings / sweep / "sweep.json").read_text())
            out[sweep] = dict(out[sweep], records=merge_timings(out[sweep]["records"], timed["records"]),
                              timing_platform=f"{timed['devices']} {timed['platform'].upper()}, {timed['dtype']}"
                                              + (", random weights" if "random" in timed["model"] else ""))
    for name in PRETRAINED_FINETUNES:
        if (run / f"finetune-{name}.json").is_file():
            out["finetune"][name] = tool_json(run / f"finetune-{name}.json")
    return out


def pretrained_report(run: Path, out: Path, timings: Path | None) -> str:
    """Copy the SmolLM2 study's results into OUT, draw its plots, and return the tables of the README."""
    res = load_pretrained(run, timings)
    for name in ("search.json", "eval_default.json", "eval_searched.json",
                 *(f"finetune-{n}.json" for n in res["finetune"])):
        shutil.copy2(run / name, out / name)
    for sweep in ("sweep", "positions"):
        runs = res[sweep]
        (out / f"{sweep}.json").write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
        shutil.copy2(run / sweep / "sweep.txt", out / f"{sweep}.txt")
        where = runs.get("timing_platform") or f"{runs['devices']} {runs['platform'].upper()} (this run's own)"
        plot(runs["records"], out / f"{sweep}.png",
             f"SmolLM2-135M-Instruct (Q4_1 GGUF): LP plans; decode timed on {where}", "decode ms/token (batch 1)",
             f"val perplexity ({runs['records'][0]['tokens']} tokens)")
    ft = res["finetune"]
    if ft:
        r = next(iter(ft.values()))
        plot_finetune(ft, out / "finetune.png", f"SmolLM2-135M: fine-tuning only the paired layers ({r['lp']})",
                      f"fine-tuning steps ({r['tokens_seen'] // max(1, r['steps'])} tokens each)")
    s, ev = res["search"], res["eval"]
    where = res["sweep"].get("timing_platform") or "this run's own CPU"
    return "\n".join([
        f"Δ sweep (val.txt; decode timing: {where}):", "", sweep_table(res["sweep"]), "",
        "Position of a Δ=8 range:", "", sweep_table(res["positions"]), "",
        f"Plan search (greedy, {s['evaluations']} evaluations on dev.txt's first {s.get('tokens', '?')} tokens): "
        f"found `--lp {s['best']['lp']}` (dev ppl {s['best']['ppl']:.3f}); default range `--lp {s['default']['lp']}` "
        f"(dev ppl {s['default']['ppl']:.3f}); sequential {s['sequential_ppl']:.3f}. On val: searched "
        f"{ev['searched']['ppl']:.3f} (accuracy {ev['searched']['accuracy']:.4f}), default "
        f"{ev['default']['ppl']:.3f} (accuracy {ev['default']['accuracy']:.4f}).", "",
        "Fine-tuning:", "", finetune_table(ft), ""]
        + ([quantize_report(run, out)] if (run / "quantize").is_dir() else []))


def quantize_report(run: Path, out: Path) -> str:
    """The quantize stage's results: its JSON files copied to OUT/quantize/, and its table under a heading."""
    records = load_quantize(run)
    if not records:
        raise ValueError("no RUN/quantize/*.json")
    (out / "quantize").mkdir(exist_ok=True)
    for f in sorted((run / "quantize").glob("*.json")):
        shutil.copy2(f, out / "quantize" / f.name)
    return (f"Quantized matrices (val.txt's first {records[0]['tokens'] + 1} tokens):\n\n"
            + quantize_table(records) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the RUN directory of bench/quality.sh (or bench/quality_smollm2.sh)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pretrained", action="store_true", help="RUN is bench/quality_smollm2.sh's")
    p.add_argument("--timings", type=Path, default=None,
                   help="with --pretrained: a directory with sweep/ and positions/ sweeps whose decode ms/token to use")
    p.add_argument("--quantize-only", action="store_true",
                   help="with --pretrained: only the quantize stage's table, to OUT/quantize.md")
    args = p.parse_args(argv)
    if args.pretrained:
        name = "quantize.md" if args.quantize_only else "quality.md"
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            text = (quantize_report(args.run, args.out) if args.quantize_only
                    else pretrained_report(args.run, args.out, args.timings))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {args.run}: incomplete quality run or timings ({e})", file=sys.stderr)
            return 2
        (args.out / name).write_text(text)
        print(text)
        return 0
    try:
        res = load(args.run)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.run}: incomplete quality run ({e})", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("train.json", "search.json", "eval_sequential.json", *(f"finetune-{n}.json" for n in res["finetune"])):
        shutil.copy2(args.run / name, args.out / name)
    for sweep in ("sweep", "positions"):
        for ext in ("json", "txt"):
            shutil.copy2(args.run / sweep / f"sweep.{ext}", args.out / f"{sweep}.{ext}")
        runs = res[sweep]
        plot(runs["records"], args.out / f"{sweep}.png",
             f"16-layer Llama trained on the Python stdlib: LP plans, {runs['dtype']}, 1 H200",
             "decode ms/token (batch 1, median of 3)", f"val perplexity ({runs['records'][0]['tokens']} tokens)")
    plot_finetune(res["finetune"], args.out / "finetune.png")
    t, s = res["train"], res["search"]
    text = "\n".join([
        f"Trained: {t['steps']} steps, {t['tokens_seen']:,} tokens, {t['params']:,} parameters; val perplexity "
        f"{t['val_ppl']:.2f} (non-overlapping 256-token windows) against a unigram model's {t['unigram_ppl']:.1f}.",
        "", "Δ sweep (val.txt, windows of 256 with stride 128; decode on 1 H200, batch 1):", "",
        sweep_table(res["sweep"]), "", "Position of a Δ=8 range:", "", sweep_table(res["positions"]), "",
        f"Plan search (greedy, {s['evaluations']} evaluations on dev.txt's first {s.get('tokens', '?')} tokens): "
        f"found `--lp {s['best']['lp']}` (dev ppl {s['best']['ppl']:.3f}); default range `--lp {s['default']['lp']}` "
        f"(dev ppl {s['default']['ppl']:.3f}); sequential {s['sequential_ppl']:.3f}.", "",
        "Fine-tuning:", "", finetune_table(res["finetune"]), ""])
    (args.out / "quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
