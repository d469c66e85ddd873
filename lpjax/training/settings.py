"""What decides a training run (`Hyper`: a resumed run must match it exactly) and what does not (`Cadence`)."""

from __future__ import annotations

import dataclasses

from lpjax.errors import LPJaxError
from lpjax.weights import DTYPES

# float16 is not offered for the forward/backward: the loop has no loss scaling, which float16 gradients need
COMPUTE_DTYPES = tuple(d for d in DTYPES if d != "float16")


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Everything that decides the training trajectory (a resumed run must match it exactly)."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    weight_decay: float
    clip: float
    seed: int
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    compute_dtype: str = "bfloat16"

    def check(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise LPJaxError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.seq_len < 2:
            raise LPJaxError(f"--seq-len {self.seq_len}: must be at least 2")
        if not self.lr > 0:
            raise LPJaxError(f"--lr {self.lr}: must be positive")
        if not 0 <= self.warmup < self.steps:
            raise LPJaxError(f"--warmup {self.warmup}: must be at least 0 and below --steps ({self.steps})")
        if self.weight_decay < 0 or self.clip < 0:
            raise LPJaxError("--weight-decay and --clip must not be negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LPJaxError(f"--min-lr-ratio {self.min_lr_ratio}: must be between 0 and 1")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise LPJaxError(f"--compute-dtype {self.compute_dtype}: choose {' or '.join(COMPUTE_DTYPES)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When to log, evaluate, save and stop: none of it changes the result."""

    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    stop_after: int = 0  # stop (state saved) after this step, as an interruption would; 0: never
    keep: int = 2  # training-state checkpoints kept

    def check(self) -> None:
        for name in ("log_every", "eval_every", "save_every", "stop_after", "keep"):
            if getattr(self, name) < (1 if name in ("log_every", "keep") else 0):
                raise LPJaxError(f"--{name.replace('_', '-')} {getattr(self, name)}: out of range")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step minimises. `lm`: next-token cross-entropy on the text. `distill`: KL(teacher || student) of the
    next-token distributions at `temperature` (scaled by its square, so gradients keep their size as it changes),
    where the teacher is the same checkpoint run sequentially, frozen, in the same compiled step."""

    kind: str = "lm"  # "lm" | "distill"
    temperature: float = 1.0

    def check(self) -> None:
        if self.kind not in ("lm", "distill"):
            raise LPJaxError(f"loss {self.kind!r}: choose lm or distill")
        if not self.temperature > 0:
            raise LPJaxError(f"--distill-temperature {self.temperature}: must be positive")

    @property
    def distill(self) -> bool:
        return self.kind == "distill"

    def describe(self) -> str:
        if not self.distill:
            return "LM loss (next-token cross-entropy on the text)"
        return f"distillation from the sequential model (KL, temperature {self.temperature:g})"


LM = Objective()
