"""Layer-Parallelism plans: which consecutive layers run as a pair.

A plan is a set of disjoint pairs of consecutive layers (a, a+1). Its usual spelling is a range `START:END` of even
length, paired (START, START+1), (START+2, START+3), ...; a list of ranges `4:6,10:16` is a plan too. The model runs
as a sequence of *stages*: a stage is one layer, or one pair evaluated on the same input (docs/design.md section 1).
Plans are applied at load time, so changing the plan never needs a re-conversion. `python -m lpjax.plan` is the
plan search (lpjax/plan/__main__.py over lpjax/quality/search.py).
"""

from __future__ import annotations

import dataclasses

from lpjax.errors import LPJaxError


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the forward pass: `layers` holds one layer id, or two for an LP pair."""

    layers: tuple[int, ...]

    @property
    def is_pair(self) -> bool:
        return len(self.layers) == 2

    @property
    def name(self) -> str:
        """Parameter-tree key of the stage: `layer_7` or `pair_20_21`."""
        return ("pair_" if self.is_pair else "layer_") + "_".join(str(i) for i in self.layers)


@dataclasses.dataclass(frozen=True)
class LPPlan:
    """A validated set of disjoint consecutive pairs for a model of `n_layers` layers."""

    n_layers: int
    pairs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        seen: set[int] = set()
        for a, b in self.pairs:
            if b != a + 1:
                raise LPJaxError(f"LP pair ({a}, {b}) is not two consecutive layers")
            if a < 0 or b >= self.n_layers:
                raise LPJaxError(f"LP pair ({a}, {b}) is outside the model's layers 0..{self.n_layers - 1}")
            if a in seen or b in seen:
                raise LPJaxError(f"LP pair ({a}, {b}) overlaps another pair of the plan")
            seen.update((a, b))
        object.__setattr__(self, "pairs", tuple(sorted(self.pairs)))

    @classmethod
    def parse(cls, spec: str | None, n_layers: int) -> LPPlan:
        """Parse `START:END[,START:END...]`; empty, `none` or `0` give the plain sequential model."""
        spec = (spec or "").strip()
        if spec.lower() in ("", "none", "0", "off"):
            return cls(n_layers)
        pairs: list[tuple[int, int]] = []
        for part in spec.split(","):
            bounds = part.strip().split(":")
            if len(bounds) != 2 or not all(x.strip().lstrip("-").isdigit() for x in bounds):
                raise LPJaxError(f"--lp {spec!r}: expected START:END (for example 16:30) or a list 4:6,10:16")
            start, end = (int(x) for x in bounds)
            if not 0 <= start <= end <= n_layers:
                raise LPJaxError(
                    f"--lp {part.strip()}: range must satisfy 0 <= START <= END <= {n_layers} (the model has "
                    f"{n_layers} layers)"
                )
            if (end - start) % 2:
                raise LPJaxError(
                    f"--lp {part.strip()}: the range holds {end - start} layers, an odd number; LP pairs layers two "
                    "by two, so END - START must be even"
                )
            pairs.extend((i, i + 1) for i in range(start, end, 2))
        return cls(n_layers, tuple(pairs))

    @classmethod
    def ending_before_last(cls, delta: int, n_layers: int, margin: int = 2) -> LPPlan:
        """The benchmark default: `delta` paired layers ending `margin` layers before the last."""
        end = n_layers - margin
        return cls.parse(f"{end - delta}:{end}" if delta else "", n_layers)

    @property
    def delta(self) -> int:
        """Number of layers that run in pairs (the paper's Δ)."""
        return 2 * len(self.pairs)

    @property
    def depth(self) -> int:
        """Number of sequential stages: the model's effective depth."""
        return self.n_layers - len(self.pairs)

    @property
    def stages(self) -> tuple[Stage, ...]:
        firsts = {a for a, _ in self.pairs}
        out, i = [], 0
        while i < self.n_layers:
            if i in firsts:
                out.append(Stage((i, i + 1)))
                i += 2
            else:
                out.append(Stage((i,)))
                i += 1
        return tuple(out)

    def spec(self) -> str:
        """The `--lp` spelling of this plan, merging adjacent pairs into ranges ('' for no pairs)."""
        ranges: list[list[int]] = []
        for a, b in self.pairs:
            if ranges and ranges[-1][1] == a:
                ranges[-1][1] = b + 1
            else:
                ranges.append([a, b + 1])
        return ",".join(f"{s}:{e}" for s, e in ranges)

    def describe(self) -> str:
        if not self.pairs:
            return f"none (sequential, {self.n_layers} layers)"
        return f"{self.spec()} (Δ={self.delta}, depth {self.depth} of {self.n_layers})"


def parse_deltas(text: str, flag: str = "--delta") -> list[int]:
    """A list of Δ (how many layers run as pairs), `0,2,4` -> [0, 2, 4], each once in the order given: the one
    parser of every `--delta` flag. Whether a model can take each Δ is `default_plan`'s to say."""
    try:
        deltas = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise LPJaxError(f"{flag} {text}: expected comma-separated even layer counts, e.g. 0,2,4,8") from None
    if not deltas:
        raise LPJaxError(f"{flag}: give at least one layer count, e.g. 0,2,4,8")
    if any(d < 0 for d in deltas):
        raise LPJaxError(f"{flag} {text}: layer counts cannot be negative")
    return list(dict.fromkeys(deltas))


def default_plan(delta: int, n_layers: int, flag: str = "--delta") -> LPPlan:
    """The default range of `delta` layers (`LPPlan.ending_before_last`), with the reason when the model cannot
    have it."""
    if delta % 2:
        raise LPJaxError(f"{flag} {delta}: an odd number of layers; LP pairs layers two by two, so Δ must be even")
    try:
        return LPPlan.ending_before_last(delta, n_layers)
    except LPJaxError as e:
        raise LPJaxError(f"{flag} {delta} (default range, ending two layers before the last): {e}") from None
