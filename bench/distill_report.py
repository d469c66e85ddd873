"""The plot and table of the distillation study (`bench/quality_distill.sh`), from its fine-tunes' JSON outputs.

    python -m bench.distill_report RESULTS_DIR [--out DIR]

RESULTS_DIR holds `ft-d{Δ}-{lm|distill}[-control].json`, each the last line of `python -m lpjax.finetune --json`.
Draws DIR/distill.png (val perplexity and next-token accuracy against fine-tuning steps, one column per Δ: the LM
loss and distillation, each beside its control, with the sequential model as a line) and writes DIR/distill.md: per
run, val perplexity and accuracy before and after, and how much of LP's perplexity loss came back measured against
the control (1 - (LP after - control after) / (LP before - sequential)). DIR defaults to RESULTS_DIR.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from bench.records import tool_json

RUNS = (("lm", False, "LM loss", "tab:blue", "-"), ("lm", True, "LM loss, control (no LP)", "tab:blue", "--"),
        ("distill", False, "distillation", "tab:red", "-"),
        ("distill", True, "distillation, control (no LP)", "tab:red", "--"))
NAME = re.compile(r"^ft-d(\d+)-(lm|distill)(-control)?\.json$")
VARIANT = re.compile(r"^ft-d(\d+)-(lm|distill)-(.+?)(-control)?\.json$")  # other settings: ft-d8-distill-lr3e-4.json


def last_json(path: Path) -> dict:
    if (got := tool_json(path)) is None:
        raise SystemExit(f"error: {path}: empty (did its run fail? see the .log beside it)")
    return got


def load(results: Path) -> tuple[dict[int, dict[tuple[str, bool], dict]], dict[int, dict[str, dict]]]:
    """({Δ: {(loss, control): run summary}}, {Δ: {variant name: run summary}}): the study's runs, and runs of the
    same Δ and loss with other settings (named ft-d{Δ}-{loss}-{what}[-control].json)."""
    out: dict[int, dict] = {}
    variants: dict[int, dict] = {}
    for path in sorted(results.glob("ft-d*.json")):
        if m := NAME.match(path.name):
            out.setdefault(int(m.group(1)), {})[(m.group(2), bool(m.group(3)))] = last_json(path)
        elif m := VARIANT.match(path.name):
            variants.setdefault(int(m.group(1)), {})[path.stem.removeprefix(f"ft-d{m.group(1)}-")] = last_json(path)
    if not out:
        raise SystemExit(f"error: {results}: no ft-d*.json fine-tune results")
    return dict(sorted(out.items())), dict(sorted(variants.items()))


def best_control(runs: dict, variants: dict, loss: str) -> dict | None:
    """The control of `loss` with the lowest val perplexity after training, among the study's and the variants'
    (the strictest reference: a share measured against it is the smallest)."""
    controls = [r for (kind, control), r in runs.items() if control and kind == loss]
    controls += [r for r in variants.values() if r["control"] and r["loss"] == loss]
    return min(controls, key=lambda r: r["val_ppl_after"], default=None)


def share(run: dict, control: dict) -> float | None:
    """1 - (LP after - control after) / (LP before - sequential): LP's perplexity loss won back beyond what the
    control gained; None when LP cost nothing to begin with."""
    gap_before = run["val_ppl_before"] - run["val_ppl_sequential"]
    return 1 - (run["val_ppl_after"] - control["val_ppl_after"]) / gap_before if gap_before > 0 else None


def curve(r: dict) -> tuple[list[int], list[float], list[float]]:
    """(steps, val perplexity, val accuracy), step 0 being the model before fine-tuning."""
    evals = r["evals"]
    return ([0] + [e[0] for e in evals], [r["val_ppl_before"]] + [math.exp(e[1]) for e in evals],
            [r["val_accuracy_before"]] + [e[2] for e in evals])


def recovered(runs: dict) -> dict[str, float | None]:
    """Per loss: the share of LP's perplexity loss won back, measured against that loss's control."""
    out = {}
    for loss in ("lm", "distill"):
        lp, control = runs.get((loss, False)), runs.get((loss, True))
        out[loss] = None if lp is None or control is None else share(lp, control)
    return out


def tokens_a_step(r: dict) -> int:
    return r["tokens_seen"] // max(r["steps"], 1)


def variants_table(data: dict, variants: dict) -> str:
    """The runs with other settings, each measured against the strictest control of its Δ and loss."""
    lines = ["| Δ | run | loss | tokens a step | steps | val ppl before | val ppl after | accuracy after "
             "| LP loss recovered vs the best control |", "|---|---|---|---|---|---|---|---|---|"]
    for delta, runs in variants.items():
        for name, r in runs.items():
            control = best_control(data.get(delta, {}), runs, r["loss"])
            rec = share(r, control) if control is not None and not r["control"] else None
            lines.append(f"| {delta} | {name} | {r['loss']}{' (control)' if r['control'] else ''} | "
                         f"{tokens_a_step(r):,} | {r['steps']} | {r['val_ppl_before']:.3f} | {r['val_ppl_after']:.3f} "
                         f"| {r['val_accuracy_after']:.4f} | {'' if rec is None else f'{100 * rec:.0f}%'} |")
    return "\n".join(lines)


def table(data: dict) -> str:
    lines = ["| Δ | run | trained layers | steps | val ppl before | val ppl after | accuracy before | accuracy after "
             "| LP loss recovered vs control |", "|---|---|---|---|---|---|---|---|---|"]
    for delta, runs in data.items():
        first = next(iter(runs.values()))
        lines.append(f"| {delta} | sequential model | | | {first['val_ppl_sequential']:.3f} | | "
                     f"{first['val_accuracy_sequential']:.4f} | | |")
        share = recovered(runs)
        for loss, control, label, _, _ in RUNS:
            r = runs.get((loss, control))
            if r is None:
                continue
            rec = "" if control or share[loss] is None else f"{100 * share[loss]:.0f}%"
            lines.append(f"| {delta} | {label} | {r['lp'] if not control else r['lp'] + ' (no LP)'} | {r['steps']} | "
                         f"{r['val_ppl_before']:.3f} | {r['val_ppl_after']:.3f} | {r['val_accuracy_before']:.4f} | "
                         f"{r['val_accuracy_after']:.4f} | {rec} |")
    return "\n".join(lines)


def plot(data: dict, variants: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(data), figsize=(5.2 * len(data), 7.2), squeeze=False)
    for col, (delta, runs) in enumerate(data.items()):
        first = next(iter(runs.values()))
        batch = f"{tokens_a_step(first):,} tokens a step"
        for loss, control, label, color, ls in RUNS:
            r = runs.get((loss, control))
            if r is None:
                continue
            steps, ppl, acc = curve(r)
            axes[0][col].plot(steps, ppl, color=color, ls=ls, marker="o", ms=2, label=label)
            axes[1][col].plot(steps, acc, color=color, ls=ls, marker="o", ms=2, label=label)
        others = [(n, r) for n, r in variants.get(delta, {}).items() if not r["control"]]
        for (name, r), color in zip(others, ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive")):
            steps, ppl, acc = curve(r)
            label = f"{name} ({tokens_a_step(r):,} tokens a step)"
            axes[0][col].plot(steps, ppl, color=color, lw=1, marker=".", ms=2, label=label)
            axes[1][col].plot(steps, acc, color=color, lw=1, marker=".", ms=2, label=label)
        for row, key, what in ((0, "val_ppl_sequential", "val perplexity (lower is better)"),
                               (1, "val_accuracy_sequential", "val next-token accuracy (higher is better)")):
            ax = axes[row][col]
            ax.axhline(first[key], color="gray", lw=1, ls=":",
                       label=f"sequential, not fine-tuned ({first[key]:.4g})")
            ax.set_ylabel(what)
            ax.set_xlabel(f"fine-tuning steps ({batch})")
            ax.legend(fontsize=7, handlelength=3)
        values = [v for line in axes[0][col].get_lines() for v in line.get_ydata()]
        if max(values) / min(values) > 4:  # an LP model far above the rest: a log scale keeps the others readable
            axes[0][col].set_yscale("log")
        axes[0][col].set_title(f"Δ={delta}: --lp {runs.get(('lm', False), first)['lp']}, only paired layers train")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distill_report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="directory of ft-d*.json results")
    p.add_argument("--out", type=Path, default=None, help="where distill.png and distill.md go (default: results)")
    args = p.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    data, variants = load(args.results)
    plot(data, variants, out / "distill.png")
    md = table(data) + (f"\n\nOther settings:\n\n{variants_table(data, variants)}" if variants else "")
    (out / "distill.md").write_text(md + "\n")
    print(md)
    print(f"wrote {out / 'distill.png'} and {out / 'distill.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
