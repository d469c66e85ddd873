"""The plan search (the library under `python -m lpjax.plan`): the Δ/2 disjoint pairs of consecutive layers that
cost the least perplexity.

Pairs may sit anywhere in the model, not only in one range. The search adds one pair (i, i+1) at a time to partial
plans: greedy by default (each step keeps the one plan whose new pair raised perplexity the least), or a beam search
with `--beam K` (each step keeps the K best partial plans). A partial plan that leaves no room for the pairs still
to come is never kept. With a beam as wide as the number of partial plans of every size the search is exhaustive.

Layer 0 and the last layer are never paired by default (`--exclude-first 1 --exclude-last 1`): the default range
(ending two before the last) keeps them sequential too, a model's first and last layers are usually the least
interchangeable ones, and leaving them out saves evaluations. Pass 0 to let the search measure them as well.

Every candidate plan costs one perplexity run over the texts' first `--max-tokens` tokens (default 4096, in
`lpjax.eval`'s windows). On one device that run is a pass of one compiled program that takes the plan as an input
(lpjax/quality/plan_data.py): the whole search compiles it once per batch shape and re-stacks no weights. On more
devices each plan gets an engine of its own (a re-stack of the weights and a compile per plan). The default range
of the same Δ and the sequential model are scored the same way for comparison; when the default range lies in the
search space and scores better than what the search found, it is the answer (the result is never worse than it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan
from lpjax.quality.perplexity import perplexity

if TYPE_CHECKING:
    from lpjax.quality.plan_data import PlanForward

Pairs = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Candidate pairs (i, i+1) of a model of `n_layers` layers, leaving the first/last layers unpaired."""

    n_layers: int
    exclude_first: int = 1
    exclude_last: int = 1

    def __post_init__(self):
        if self.exclude_first < 0 or self.exclude_last < 0:
            raise LPJaxError("--exclude-first/--exclude-last: layer counts cannot be negative")

    @property
    def lo(self) -> int:
        return self.exclude_first

    @property
    def hi(self) -> int:
        """One past the last layer that may be paired."""
        return self.n_layers - self.exclude_last

    @property
    def candidates(self) -> Pairs:
        return tuple((i, i + 1) for i in range(self.lo, self.hi - 1))

    def room(self, pairs: Pairs = ()) -> int:
        """How many more disjoint pairs fit beside `pairs`: each run of L free candidate layers holds L // 2."""
        used = {layer for p in pairs for layer in p}
        total = run = 0
        for i in range(self.lo, self.hi):
            if i in used:
                total, run = total + run // 2, 0
            else:
                run += 1
        return total + run // 2

    def allows(self, plan: LPPlan) -> bool:
        return all(self.lo <= a and b < self.hi for a, b in plan.pairs)

    def describe(self) -> str:
        kept = [str(i) for i in range(self.lo)] + [str(i) for i in range(self.hi, self.n_layers)]
        return (f"{len(self.candidates)} candidate pairs (i, i+1) within layers {self.lo}..{self.hi - 1}"
                + (f"; layer(s) {', '.join(kept)} never paired" if kept else ""))

    def check(self, delta: int) -> int:
        """Number of pairs for `delta`, or why the model cannot have that many."""
        if delta <= 0 or delta % 2:
            raise LPJaxError(f"--delta {delta}: must be a positive even number of layers (LP pairs layers two by two)")
        if delta > 2 * self.room():
            raise LPJaxError(
                f"--delta {delta}: too large; at most {2 * self.room()} of this {self.n_layers}-layer model's layers "
                f"can be paired with --exclude-first {self.exclude_first} --exclude-last {self.exclude_last}")
        return delta // 2


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the search: how many plans of `size` pairs were scored, and the ones kept (best first)."""

    size: int
    scored: int
    kept: tuple[tuple[float, Pairs], ...]


def children(space: SearchSpace, plan: Pairs, n_pairs: int) -> set[Pairs]:
    """`plan` plus one more disjoint candidate pair, where the pairs still to come keep room."""
    used = {layer for p in plan for layer in p}
    out = set()
    for p in space.candidates:
        if used.isdisjoint(p):
            child = tuple(sorted(plan + (p,)))
            if space.room(child) >= n_pairs - len(child):
                out.add(child)
    return out


def beam_search(space: SearchSpace, n_pairs: int, score: Callable[[Pairs], float], beam: int = 1,
                on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """Grow plans one pair at a time, keeping the `beam` lowest-scoring ones (ties broken by the pairs, so the
    result is deterministic). The last step's first kept plan is the answer."""
    if beam < 1:
        raise LPJaxError(f"--beam {beam}: must be at least 1")
    plans: list[Pairs] = [()]
    steps = []
    for size in range(1, n_pairs + 1):
        grown = sorted(set().union(*(children(space, p, n_pairs) for p in plans)))
        scored = sorted((score(c), c) for c in grown)
        steps.append(Step(size, len(scored), tuple(scored[:beam])))
        plans = [c for _, c in scored[:beam]]
        if on_step:
            on_step(steps[-1])
    return steps


class Scorer:
    """A plan's score, computed once per plan (each evaluation is a perplexity run)."""

    def __init__(self, fn: Callable[[Pairs], float]):
        self.fn, self.values = fn, {}

    def __call__(self, pairs: Pairs) -> float:
        if pairs not in self.values:
            self.values[pairs] = float(self.fn(pairs))
        return self.values[pairs]

    @property
    def evaluations(self) -> int:
        return len(self.values)


def plan_perplexity(engine, texts: list[list[int]], window: int, stride: int,
                    batch_size: int = 1) -> Callable[[Pairs], float]:
    """pairs -> perplexity of the engine's weights under that plan (`quality.perplexity.perplexity`): by the
    plan-as-data forward where it runs (`scoring(engine)` says which), else by an engine per plan."""
    from lpjax.quality import plan_data  # JAX only once a model is loaded

    if plan_data.unsupported(engine) is not None:
        return engine_per_plan(engine, texts, window, stride, batch_size)
    return PlanDataPerplexity(plan_data.PlanForward(engine), texts, window, stride, batch_size)


@dataclasses.dataclass(frozen=True)
class PlanDataPerplexity:
    """pairs -> perplexity by one plan-as-data forward (`quality.plan_data.PlanForward`): every plan runs the same
    compiled programs, one per batch shape."""

    forward: PlanForward
    texts: list[list[int]]
    window: int
    stride: int
    batch_size: int = 1

    def __call__(self, pairs: Pairs) -> float:
        plan = LPPlan(self.forward.config.n_layers, pairs)
        return perplexity(self.forward.under(plan), self.texts, self.window, self.stride, self.batch_size)["ppl"]


def engine_per_plan(engine, texts: list[list[int]], window: int, stride: int,
                    batch_size: int = 1) -> Callable[[Pairs], float]:
    """pairs -> the perplexity of that plan's engine (`engine.with_plan`: a re-read and re-stack of the weights, and
    a compile of its forward, per plan): the scoring of settings the plan-as-data forward does not run."""
    def ppl(pairs: Pairs) -> float:
        plan = LPPlan(engine.config.n_layers, pairs)
        e = engine if plan == engine.plan else engine.with_plan(plan)
        return perplexity(e, texts, window, stride, batch_size)["ppl"]

    return ppl


def scoring(engine) -> str:
    """How `plan_perplexity` scores plans on `engine`, in words."""
    from lpjax.quality import plan_data

    why = plan_data.unsupported(engine)
    if why is None:
        return "one compiled forward for every plan (the plan an input)"
    return f"an engine per plan (a re-stack and a compile each): {why}"


def method_name(beam: int) -> str:
    return "greedy (beam 1)" if beam == 1 else f"beam search (beam {beam})"


def search(space: SearchSpace, delta: int, score: Callable[[Pairs], float], beam: int = 1,
           on_step: Callable[[Step], None] | None = None) -> dict:
    """Run the search, score the default range and the sequential model alike; a JSON-ready summary. `score` maps
    pairs to a perplexity (`plan_perplexity`); every plan is scored at most once."""
    n_pairs = space.check(delta)
    score = Scorer(score)
    steps = beam_search(space, n_pairs, score, beam, on_step)
    found_ppl, found = steps[-1].kept[0]
    best = {"lp": LPPlan(space.n_layers, found).spec(), "pairs": [list(p) for p in found], "ppl": found_ppl,
            "found_by": method_name(beam)}
    default = None
    try:
        plan = LPPlan.ending_before_last(delta, space.n_layers)
    except LPJaxError:  # Δ too large for a range ending two before the last; the search itself may still fit it
        plan = None
    if plan is not None:
        default = {"lp": plan.spec(), "ppl": score(plan.pairs), "in_search_space": space.allows(plan)}
        if default["in_search_space"] and default["ppl"] < found_ppl:
            best = {"lp": plan.spec(), "pairs": [list(p) for p in plan.pairs], "ppl": default["ppl"],
                    "found_by": "default range (scored better than the search's plan)"}
    sequential = score(())
    return {
        "best": best, "default": default, "sequential_ppl": sequential, "delta": delta, "method": method_name(beam),
        "beam": beam, "evaluations": score.evaluations, "exclude_first": space.exclude_first,
        "exclude_last": space.exclude_last, "candidates": len(space.candidates),
        "steps": [{"pairs": s.size, "scored": s.scored,
                   "kept": [{"lp": LPPlan(space.n_layers, p).spec(), "ppl": v} for v, p in s.kept]} for s in steps],
    }


def format_result(res: dict) -> str:
    """The answer as `--lp` arguments with their perplexities, next to the default range and the sequential model."""
    best, default, seq = res["best"], res["default"], res["sequential_ppl"]
    depth = res["n_layers"] - res["delta"] // 2
    head = (f"method: {res['method']}, {res['evaluations']} evaluations (perplexity runs on {res['tokens']} tokens) "
            f"in {res['seconds']:.1f} s")
    lines = [head]
    lines.append(f"best:       --lp {best['lp']:<20} ppl {best['ppl']:.4f} ({best['ppl'] - seq:+.4f} vs sequential; "
                 f"Δ={res['delta']}, depth {depth} of {res['n_layers']}; found by {best['found_by']})")
    if default:
        where = "" if default["in_search_space"] else ", outside the search space"
        lines.append(f"default:    --lp {default['lp']:<20} ppl {default['ppl']:.4f} ({default['ppl'] - seq:+.4f}; "
                     f"the range ending two layers before the last{where})")
    else:
        lines.append(f"default:    none (Δ={res['delta']} does not fit a range ending two layers before the last)")
    lines.append(f"sequential: ppl {seq:.4f}")
    return "\n".join(lines)
