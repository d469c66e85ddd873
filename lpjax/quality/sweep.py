"""The plan sweep as a library (`python -m lpjax.sweep` is its command line): which plans to measure, how decode
time is measured, the Pareto front, the table and the plot.

Perplexity is `quality.perplexity`'s. Decode time is measured on the devices in use: batch 1, `new_tokens` new tokens
after a short prompt, EOS ignored, one on-device loop; one warm-up generation of the same shape, then the median
ms/token of `repeats` generations. Timings exclude compilation.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path

from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan, default_plan
from lpjax.quality.perplexity import perplexity

OUT_FILES = ("sweep.txt", "sweep.json", "sweep.png")


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """A plan to measure and why it is in the sweep: `sequential`, `default` (the range ending two before the last),
    `position` (another start of a Δ-range) or `given` (--lp)."""

    plan: LPPlan
    kind: str

    @property
    def label(self) -> str:
        return self.plan.spec() or "sequential"


@dataclasses.dataclass(frozen=True)
class Timing:
    """How decode time is measured: batch 1, `new_tokens` after a `prompt_tokens` prompt, median of `repeats`."""

    prompt_tokens: int
    new_tokens: int
    repeats: int

    def describe(self) -> str:
        return (f"decode ms/token: batch 1, {self.new_tokens} new tokens after a {self.prompt_tokens}-token prompt, "
                f"EOS ignored, median of {self.repeats} run(s) after 1 warm-up, compile time excluded")


# ---------------------------------------------------------------------------------------------------- the sweep


def sweep_plans(n_layers: int, deltas: list[int], position: bool = False, step: int = 2,
                given: str | None = None) -> list[SweepPlan]:
    """The sequential plan, then per Δ its default range and (with `position`) every start 0, step, ... ."""
    if step < 1:
        raise LPJaxError(f"--position-step {step}: must be at least 1")
    out = {LPPlan(n_layers): SweepPlan(LPPlan(n_layers), "sequential")}
    for d in deltas:
        plan = default_plan(d, n_layers)
        out.setdefault(plan, SweepPlan(plan, "default"))
        if position and d > 0:
            for start in range(0, n_layers - d + 1, step):
                plan = LPPlan.parse(f"{start}:{start + d}", n_layers)
                out.setdefault(plan, SweepPlan(plan, "position"))
    if given:
        plan = LPPlan.parse(given, n_layers)
        out.setdefault(plan, SweepPlan(plan, "given"))
    return sorted(out.values(), key=lambda s: (s.plan.delta, s.plan.pairs))


def decode_ms(engine, prompt: list[int], timing: Timing, max_len: int | None = None) -> list[float]:
    """Decode ms/token of `timing.repeats` generations after one warm-up generation of the same shape."""
    def run() -> float:
        return engine.generate([prompt], timing.new_tokens, max_len=max_len, eos=()).decode_ms_per_step

    run()
    return [run() for _ in range(timing.repeats)]


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (ppl, ms) points no other point beats on both (lower or equal on both, lower on one)."""
    def beaten(p):
        return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)

    return [not beaten(p) for p in points]


def finish(records: list[dict]) -> list[dict]:
    """Δppl and speed-up against the sequential record, and the Pareto front, once every record is measured."""
    seq = next(r for r in records if r["delta"] == 0)
    front = pareto_front([(r["ppl"], r["ms_per_token"]) for r in records])
    out = []
    for r, f in zip(records, front):
        out.append(dict(r, delta_ppl=r["ppl"] - seq["ppl"], pareto=f,
                        speedup=seq["ms_per_token"] / r["ms_per_token"] if r["ms_per_token"] > 0 else None))
    return out


def format_table(records: list[dict]) -> str:
    head = f"{'plan':<18} {'Δ':>3} {'depth':>5} {'ppl':>10} {'Δppl':>9} {'ms/token':>9} {'speed-up':>8}  front"
    lines = [head, "-" * len(head)]
    for r in records:
        speed = f"{r['speedup']:.3f}x" if r.get("speedup") else "-"
        lines.append(f"{r['label']:<18} {r['delta']:>3} {r['depth']:>5} {r['ppl']:>10.4f} {r['delta_ppl']:>+9.4f} "
                     f"{r['ms_per_token']:>9.3f} {speed:>8}  {'*' if r['pareto'] else ''}")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Perplexity against decode ms/token, one labelled point per plan coloured by Δ, the Pareto front joined.
    Uses a Figure with the Agg canvas directly, so no global pyplot backend is touched."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    deltas = sorted({r["delta"] for r in records})
    cmap = matplotlib.colormaps["viridis"]
    for k, d in enumerate(deltas):
        rs = [r for r in records if r["delta"] == d]
        ax.scatter([r["ms_per_token"] for r in rs], [r["ppl"] for r in rs], s=36, zorder=3,
                   color=cmap(k / max(1, len(deltas) - 1)), label=f"Δ={d}" if d else "sequential")
    for r in records:
        ax.annotate(r["label"] if r["delta"] else "seq", (r["ms_per_token"], r["ppl"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    front = sorted((r for r in records if r["pareto"]), key=lambda r: (r["ms_per_token"], r["ppl"]))
    ax.plot([r["ms_per_token"] for r in front], [r["ppl"] for r in front], "--", color="crimson", lw=1, zorder=2)
    ax.scatter([r["ms_per_token"] for r in front], [r["ppl"] for r in front], s=110, facecolors="none",
               edgecolors="crimson", zorder=4, label="Pareto front")
    ax.set_xlabel(xlabel)
    ppl = [r["ppl"] for r in records]
    if max(ppl) > 5 * min(ppl):  # a broken plan (e.g. one pairing layer 0) would flatten every other point
        ax.set_yscale("log")
        ylabel += ", log scale"
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def measure(engine, sp: SweepPlan, texts: list[list[int]], window: int, stride: int, batch_size: int,
            prompt: list[int], timing: Timing, max_len: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """One plan's record: its perplexity over `texts` and its decode ms/token (`engine` runs the plan)."""
    res = perplexity(engine, texts, window, stride, batch_size, progress)
    runs = decode_ms(engine, prompt, timing, max_len)
    return {
        "label": sp.label, "lp": sp.plan.spec(), "kind": sp.kind, "delta": sp.plan.delta,
        "depth": sp.plan.depth, "pairs": [list(p) for p in sp.plan.pairs], "ppl": res["ppl"], "nll": res["nll"],
        "accuracy": res["accuracy"], "tokens": res["tokens"], "ms_per_token": statistics.median(runs),
        "ms_per_token_runs": runs, "compile_s": round(engine.compile_s, 3),
    }
