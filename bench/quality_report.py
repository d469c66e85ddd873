"""Tables and the fine-tuning plot of the quality experiment (`bench/quality.sh`), from its JSON outputs.

    python -m bench.quality_report RUN_DIR --out bench/results/quality

Copies the JSON results and the sweep plots into OUT, draws OUT/finetune.png (held-out perplexity against
fine-tuning steps: LP on the default range, LP on the searched plan, and the control that trains the same layers
without LP) and writes OUT/quality.md with the tables the README shows.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from lpjax.quality.sweep import plot

FINETUNES = (("default", "LP, default range"), ("searched", "LP, searched plan"),
             ("control", "control: same layers trained without LP"))


def last_json(path: Path) -> dict:
    """The JSON object on a file's last non-empty line (the tools print one with --json)."""
    return json.loads([line for line in path.read_text().splitlines() if line.strip()][-1])


def load(run: Path) -> dict:
    out = {"train": last_json(run / "train.json"), "search": last_json(run / "search.json"),
           "sweep": json.loads((run / "sweep" / "sweep.json").read_text()),
           "positions": json.loads((run / "positions" / "sweep.json").read_text()),
           "eval": last_json(run / "eval_sequential.json"), "finetune": {}}
    for name, _ in FINETUNES:
        if (run / f"finetune-{name}.json").is_file():
            out["finetune"][name] = last_json(run / f"finetune-{name}.json")
    return out


def sweep_table(sweep: dict) -> str:
    lines = ["| plan (`--lp`) | Δ | depth | val perplexity | Δ perplexity | decode ms/token | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in sweep["records"]:
        lines.append(f"| {r['lp'] or 'sequential'} | {r['delta']} | {r['depth']} | {r['ppl']:.3f} | "
                     f"{r['delta_ppl']:+.3f} | {r['ms_per_token']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def finetune_table(ft: dict) -> str:
    """Perplexities (non-overlapping 256-token windows of val.txt, as the training loop scores them)."""
    lines = ["| run | trained layers | val ppl before | val ppl after 400 steps |", "|---|---|---|---|"]
    for name, label in FINETUNES:
        if name in ft:
            r = ft[name]
            lines.append(f"| {label} | {r['lp']} | {r['val_ppl_before']:.3f} | {r['val_ppl_after']:.3f} |")
    return "\n".join(lines)


def plot_finetune(ft: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, label in FINETUNES:
        if name not in ft:
            continue
        r = ft[name]
        steps = [0] + [s for s, _ in r["evals"]]
        ppl = [r["val_ppl_before"]] + [math.exp(loss) for _, loss in r["evals"]]
        ax.plot(steps, ppl, marker="o", ms=3, label=f"{label} ({r['lp']})", ls="--" if r.get("control") else "-")
    seq = next(iter(ft.values()))["val_ppl_sequential"]
    ax.axhline(seq, color="gray", lw=1, ls=":", label=f"sequential model, not fine-tuned ({seq:.2f})")
    ax.set_xlabel("fine-tuning steps (32 x 256 tokens)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("Fine-tuning only the paired layers (Δ=8 of 16)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the RUN directory of bench/quality.sh")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
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
