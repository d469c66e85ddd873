"""The serving load table and plot of a `bench/serve_h200.sh` run directory.

    python -m bench.serve_report RUN [--out-md RUN/serve.md] [--out-png RUN/serve.png]

Reads RUN/gen-TAG.json (`lpjax.generate --json`, the reference decode speed of one sequence) and
RUN/load-TAG-kK-cC.json (`bench.serve_load`), and writes one markdown row per load run: output tokens/s and
requests/s, TTFT / ITL p50 and p99, TPOT; beside them the ratio of concurrency 1 to `generate` (server overhead) and
of each concurrency to 1 (batching gain). The plot shows output tokens/s against concurrency, a line per model, plan
and steps per call.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from bench import common
from bench.records import tool_json

LOAD = re.compile(r"load-(?P<tag>.+)-k(?P<k>\d+)-c(?P<c>\d+)\.json$")


def load_rows(run: Path) -> list[dict]:
    """One row per load run, sorted by tag, steps per call and concurrency, with its reference and ratios."""
    gens = {p.name[len("gen-"):-len(".json")]: tool_json(p) for p in run.glob("gen-*.json")}
    rows = []
    for p in run.glob("load-*.json"):
        m = LOAD.search(p.name)
        if m is None or (res := tool_json(p)) is None:
            continue
        gen = gens.get(m["tag"]) or {}
        rows.append({"tag": m["tag"], "k": int(m["k"]), "c": int(m["c"]), **res,
                     "generate_tokens_per_s": gen.get("decode_tokens_per_s")})
    rows.sort(key=lambda r: (r["tag"], -r["k"], r["c"]))
    for r in rows:
        base = next((b for b in rows if (b["tag"], b["k"], b["c"]) == (r["tag"], r["k"], 1)), None)
        tps, ref = r.get("output_tokens_per_s"), r["generate_tokens_per_s"]
        r["vs_generate"] = round(tps / ref, 3) if tps and ref and r["c"] == 1 else None
        r["vs_c1"] = round(tps / base["output_tokens_per_s"], 2) if tps and base and base.get("output_tokens_per_s") \
            else None
    return rows


def fmt(v, spec: str = "") -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| model, plan | steps a call | concurrency | output tokens/s | requests/s | TTFT p50 / p99 ms | "
            "ITL p50 / p99 ms | TPOT p50 ms | generate tokens/s | c=1 / generate | / c=1 | failed |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['tag']} | {r['k']} | {r['c']} | {fmt(r.get('output_tokens_per_s'), '.0f')} | "
            f"{fmt(r.get('requests_per_s'), '.2f')} | {fmt(r.get('ttft_ms_p50'))} / {fmt(r.get('ttft_ms_p99'))} | "
            f"{fmt(r.get('itl_ms_p50'))} / {fmt(r.get('itl_ms_p99'))} | {fmt(r.get('tpot_ms_p50'))} | "
            f"{fmt(r['generate_tokens_per_s'], '.0f')} | {fmt(r['vs_generate'], '.2f')} | {fmt(r['vs_c1'], '.2f')} | "
            f"{r.get('requests_failed', 0)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["tag"], r["k"]) for r in rows}):
        pts = [(r["c"], r["output_tokens_per_s"]) for r in rows if (r["tag"], r["k"]) == key
               and r.get("output_tokens_per_s")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{key[0]}, {key[1]} steps a call")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title("lpjax.serve under load (streamed, greedy)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the directory bench/serve_h200.sh wrote")
    p.add_argument("--out-md", type=Path, default=None, help="default RUN/serve.md")
    p.add_argument("--out-png", type=Path, default=None, help="default RUN/serve.png")
    args = p.parse_args(argv)
    if not args.run.is_dir():
        raise common.LPJaxError(f"{args.run}: no such directory")
    rows = load_rows(args.run)
    if not rows:
        raise common.LPJaxError(f"{args.run}: no load-TAG-kK-cC.json files")
    text = table(rows)
    print(text, end="")
    (args.out_md or args.run / "serve.md").write_text(text)
    plot(rows, args.out_png or args.run / "serve.png")
    return 0


if __name__ == "__main__":
    sys.exit(common.exit_code(main))
