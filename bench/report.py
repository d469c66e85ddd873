"""Tables and plots from benchmark records (`bench/results/<machine>.json`).

    python -m bench.report bench/results/<machine>.json [--plots DIR] [--markdown FILE]

Decode table: one row per (GPUs, Δ, batch), one column per implementation, then lpjax against the best PyTorch
baseline of the same row and the LP speed-up (Δ=0 time over Δ time, same implementation and GPU count). Versus
table: lpjax against the fastest baseline for every timed metric, "slower" in bold where it is behind. Full table:
every metric. Plot: decode ms/token by GPU count and Δ, a bar per implementation and Δ.

Quantized records (`quantize`: int8 or int4) get a "quantize" column in the tables (rows of each quantization
together; lpjax is compared with the PyTorch baselines of the same quantization, and each LP speed-up is over the
same quantization's Δ=0) and a suffix on the implementation's name in the full table and the plot
(`torch-compile int8`; `int4 g64` for a group size other than 128).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from bench.records import METRICS, read

ORDER = ("lpjax", "torch-compile", "torch-tp", "hf-static-compile", "hf-eager")
TORCH = ("torch-compile", "torch-tp", "hf-static-compile", "hf-eager")
LP_SPEEDUP = ("lpjax", "torch-compile", "torch-tp")  # implementations whose LP speed-up gets a column
DEFAULT_GROUP_SIZE = 128


def quantize_label(r: dict) -> str:
    """How a record's (or a job's) weights were stored: "" (the compute dtype), "int8", "int4", or "int4 g64" for a
    group size other than the default."""
    q = r.get("quantize")
    if not q:
        return ""
    group = r.get("group_size")
    return f"{q} g{group}" if q == "int4" and group and group != DEFAULT_GROUP_SIZE else q


def _qorder(q: str) -> tuple:
    return (0 if not q else 1 if q == "int8" else 2, q)


def _impls(recs: list[dict]) -> list[str]:
    seen = {r["impl"] for r in recs}
    return [i for i in ORDER if i in seen] + sorted(seen - set(ORDER))


def _index(recs: list[dict]) -> dict:
    """(model, impl, quantize label, gpus, Δ, batch, metric) -> value."""
    return {(r["model"], r["impl"], quantize_label(r), r["gpus"], r["lp_delta"], r["batch"], r["metric"]): r["value"]
            for r in recs}


def _rows(recs: list[dict], model: str, metric: str | None = None) -> tuple[list[tuple], bool]:
    """The (GPUs, Δ, batch, quantize label) rows of a model's table (of one metric's records when given), each
    quantization's together, and whether any is quantized (then the tables show the column)."""
    rows = {(r["gpus"], r["lp_delta"], r["batch"], quantize_label(r)) for r in recs
            if r["model"] == model and (metric is None or r["metric"] == metric)}
    return sorted(rows, key=lambda k: (k[2], _qorder(k[3]), k[0], k[1])), any(k[3] for k in rows)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def compare(ours: float | None, best: float | None) -> str:
    """lpjax's time against the best baseline's, said the way round it is."""
    if not ours or not best:
        return ""
    return f"{best / ours:.2f}x faster" if ours <= best else f"**{ours / best:.2f}x slower**"


def decode_table(recs: list[dict], model: str) -> str:
    idx, impls = _index(recs), _impls([r for r in recs if r["model"] == model])
    rows, quantized = _rows(recs, model, "decode")
    speedup_impls = [i for i in LP_SPEEDUP if i in impls]
    head = ["GPUs", "Δ", "batch", *(["quantize"] if quantized else []), *impls, "lpjax vs best PyTorch",
            *(f"LP speed-up {i}" for i in speedup_impls)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for gpus, delta, batch, q in rows:
        def get(impl, d=delta, g=gpus, b=batch, q=q):
            return idx.get((model, impl, q, g, d, b, "decode"))

        # transformers baselines run on one GPU only: they are the best PyTorch of the 1-GPU rows alone
        torch_best = min((v for i in TORCH if (v := get(i)) is not None), default=None)
        ours = get("lpjax")
        vs = compare(ours, torch_best)
        speedups = []
        for impl in speedup_impls:
            base, lp = get(impl, 0), get(impl)
            speedups.append(f"{base / lp:.2f}x" if delta and base and lp else "")
        cells = [str(gpus), str(delta), str(batch), *([q or "none"] if quantized else []),
                 *(_fmt(get(i)) for i in impls), vs, *speedups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versus_table(recs: list[dict], model: str) -> str:
    """lpjax against the fastest PyTorch baseline of the same GPUs, Δ, batch and quantization, for every timed
    metric."""
    idx = _index(recs)
    metrics = [m for m in METRICS if m != "peak_memory" and any(r["metric"] == m and r["model"] == model
                                                               for r in recs)]
    rows, quantized = _rows(recs, model)
    head = ["GPUs", "Δ", "batch", *(["quantize"] if quantized else []),
            *(f"{m}: lpjax vs best PyTorch" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for gpus, delta, batch, q in rows:
        cells = []
        for m in metrics:
            best = min(((v, i) for i in TORCH if (v := idx.get((model, i, q, gpus, delta, batch, m))) is not None),
                       default=(None, ""))
            verdict = compare(idx.get((model, "lpjax", q, gpus, delta, batch, m)), best[0])
            cells.append(f"{verdict} ({best[1]})" if verdict else "")
        lines.append("| " + " | ".join([str(gpus), str(delta), str(batch), *([q or "none"] if quantized else []),
                                        *cells]) + " |")
    return "\n".join(lines)


def full_table(recs: list[dict], model: str) -> str:
    idx = _index(recs)
    metrics = [m for m in METRICS if any(r["metric"] == m and r["model"] == model for r in recs)]
    rows = sorted({(r["impl"], quantize_label(r), r["gpus"], r["lp_delta"], r["batch"]) for r in recs
                   if r["model"] == model},
                  key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, _qorder(k[1]), k[3], k[2], k[4]))
    head = ["impl", "GPUs", "Δ", "batch", *(f"{m} ({METRICS[m][0]})" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for impl, q, gpus, delta, batch in rows:
        cells = [_fmt(idx.get((model, impl, q, gpus, delta, batch, m)), 3 if m == "single_token" else 2)
                 for m in metrics]
        name = f"{impl} {q}" if q else impl
        lines.append("| " + " | ".join([name, str(gpus), str(delta), str(batch), *cells]) + " |")
    return "\n".join(lines)


def context_line(recs: list[dict], model: str) -> str:
    """Machine, date, commit and versions of the records behind a model's tables."""
    parts = defaultdict(set)
    for r in (r for r in recs if r["model"] == model):
        parts["machine"].add(r.get("machine", "?"))
        parts["date"].add(r.get("date", "?"))
        parts["commit"].add(r.get("commit", "?"))
        parts["device"].add(r.get("device_name", "?"))
        for k, v in (r.get("versions") or {}).items():
            parts[k].add(str(v))
    return "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in parts.items())


def markdown_tables(recs: list[dict]) -> str:
    out = []
    for model in sorted({r["model"] for r in recs}):
        out += [f"### {model}: decode ms/token (lower is better)", "", decode_table(recs, model), "",
                f"### {model}: lpjax against the fastest PyTorch, every metric", "", versus_table(recs, model), "",
                f"### {model}: all metrics", "", full_table(recs, model), "", f"_{context_line(recs, model)}_", ""]
    return "\n".join(out)


def plot_decode(recs: list[dict], model: str, batch: int, path: Path) -> bool:
    """Grouped bars: x = GPU count, a bar per (implementation, Δ) measured there (colour = implementation with its
    quantization, hatched = LP). Variant runs (impl "lpjax+...") are diagnostics and stay out. False when there is
    nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in recs if r["model"] == model and r["batch"] == batch and r["metric"] == "decode"
           and "+" not in r["impl"]]
    if not sel:
        return False
    gpus = sorted({r["gpus"] for r in sel})

    def name(r: dict) -> str:
        q = quantize_label(r)
        return f"{r['impl']} {q}" if q else r["impl"]

    order = {impl: i for i, impl in enumerate(_impls(sel))}
    impls = sorted({name(r) for r in sel}, key=lambda n: (_qorder(n.partition(" ")[2]), order[n.partition(" ")[0]]))
    colors = {impl: f"C{k}" for k, impl in enumerate(impls)}
    idx = {(name(r), r["lp_delta"], r["gpus"]): r["value"] for r in sel}
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(gpus), 4.2))
    labelled = set()
    for i, g in enumerate(gpus):
        here = sorted(((impl, d) for impl, d, gg in idx if gg == g), key=lambda k: (impls.index(k[0]), k[1]))
        width = 0.8 / len(here)
        for k, (impl, d) in enumerate(here):
            label = f"{impl} Δ={d}" if d else f"{impl} (sequential)"
            bar = ax.bar(i + (k - (len(here) - 1) / 2) * width, idx[(impl, d, g)], width, color=colors[impl],
                         hatch="//" if d else None, edgecolor="white",
                         label=None if label in labelled else label)
            labelled.add(label)
            ax.bar_label(bar, fmt="%.2f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(gpus)), [f"{g} GPU" + ("s" if g > 1 else "") for g in gpus])
    values = list(idx.values())
    if max(values) > 5 * min(values):
        ax.set_yscale("log")
    ax.set_ylabel("decode ms / token (lower is better)")
    ax.set_title(f"{model}, batch {batch}: decode after a 128-token prompt (hatched: LP)", fontsize=10)
    ax.margins(y=0.25)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(recs: list[dict], directory: Path, prefix: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for model in sorted({r["model"] for r in recs}):
        for batch in sorted({r["batch"] for r in recs if r["model"] == model}):
            path = directory / f"{prefix}decode-{model}-batch{batch}.png"
            if plot_decode(recs, model, batch, path):
                out.append(path)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", type=Path, nargs="+", help="JSON-lines record files")
    p.add_argument("--plots", type=Path, default=None, help="directory for the PNG plots")
    p.add_argument("--prefix", default="", help="file-name prefix of the plots")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.records if not f.is_file()]
    if missing:
        print(f"error: no such records file: {missing[0]}", file=sys.stderr)
        return 2
    recs = [r for f in args.records for r in read(f)]
    text = markdown_tables(recs)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.plots:
        for path in write_plots(recs, args.plots, args.prefix):
            print(f"[report] {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
