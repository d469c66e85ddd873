"""What the `train` and `finetune` command lines share: flags, their checks, the progress line and the summary."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lpjax import cli
from lpjax.errors import LPJaxError
from lpjax.training.loop import FitResult
from lpjax.training.rundir import STATE_DIR
from lpjax.training.settings import COMPUTE_DTYPES, Cadence, Hyper


class StepBar:
    """A progress line on stderr with loss, tokens/s and learning rate: redrawn in place on a terminal, a line at
    most every 5 s otherwise (and always at the last step). `note` prints a line without breaking it."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.open = False  # a redrawn line is on screen with no newline after it

    def show(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        now = time.monotonic()
        if step != self.total and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        line = (f"{cli.bar_line(self.label, step, self.total)} loss {loss:.4f} | {tokens_per_s / 1e3:,.1f}k tok/s | "
                f"lr {lr:.2e}")
        if self.tty:
            self._write("\r\033[K" + line)
            self.open = True
        else:
            self._write(line + "\n")

    def note(self, message: str) -> None:
        self._write(("\n" if self.open else "") + message + "\n")
        self.open = False

    def close(self) -> None:
        if self.open:
            self._write("\n")
            self.open = False

    @staticmethod
    def _write(text: str) -> None:
        if cli.is_main_process():
            sys.stderr.write(text)
            sys.stderr.flush()


def add_training_args(p: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float, warmup: int,
                      weight_decay: float, seq_len: int | None) -> None:
    """Flags both CLIs share: data, optimizer, schedule, checkpoints, devices."""
    p.add_argument("--text", nargs="+", default=None, metavar="FILE", help="UTF-8 training text file(s)")
    p.add_argument("--val", default=None, metavar="FILE", help="held-out UTF-8 text for evaluation")
    p.add_argument("--out", required=True, type=Path, help="output directory (new or empty, or this run's: resumes)")
    g = p.add_argument_group("optimization")
    g.add_argument("--seq-len", type=int, default=seq_len, help="tokens per training window"
                   + (f" (default {seq_len})" if seq_len else " (default: min(256, the model's context))"))
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"windows per step (default {batch_size})")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument("--warmup", type=int, default=warmup, help=f"linear warm-up steps (default {warmup})")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final / peak learning rate of the cosine decay")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help=f"AdamW decay of the weight matrices (default {weight_decay:g}; norms and biases: none)")
    g.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--seed", type=int, default=0, help="data order (and initial weights when training from scratch)")
    g.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="bfloat16",
                   help="dtype of the forward/backward (weights and optimizer state stay float32)")
    g = p.add_argument_group("evaluation, checkpoints, devices")
    g.add_argument("--log-every", type=int, default=10, help="steps between progress updates (the only host syncs)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between val evaluations (0: at the end only)")
    g.add_argument("--val-windows", type=int, default=0, help="val windows scored (evenly spaced; 0: all)")
    g.add_argument("--save-every", type=int, default=500, help="steps between training-state saves (0: end only)")
    g.add_argument("--keep", type=int, default=2, help="training-state checkpoints kept")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop after this step with the state saved, as an interruption would (0: never)")
    g.add_argument("--resume", action="store_true", help="require OUT to hold a run of this setup, and resume it")
    g.add_argument("--overwrite", action="store_true", help="start over in an OUT holding an lpjax run or model")
    g.add_argument("--devices", type=int, default=None, help="devices for data parallelism (default: all visible)")
    g.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                   help="attention kernel (auto: cuDNN on GPUs in bfloat16, else XLA)")
    g.add_argument("--json", action="store_true", help="end stdout with one JSON line of results")


def hyper_from_args(args, seq_len: int) -> Hyper:
    hp = Hyper(steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, lr=args.lr, warmup=args.warmup,
               weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, min_lr_ratio=args.min_lr_ratio,
               compute_dtype=args.compute_dtype)
    hp.check()
    return hp


def cadence_from_args(args) -> Cadence:
    c = Cadence(log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
                stop_after=args.stop_after, keep=args.keep)
    c.check()
    if args.val_windows < 0:
        raise LPJaxError(f"--val-windows {args.val_windows}: must not be negative")
    return c


def read_texts(args) -> tuple[list[str], str | None]:
    """The training texts and the val text, or a one-line reason they cannot be used."""
    if not args.text:
        raise LPJaxError("no training text: give --text FILE [FILE ...]")
    texts = [cli.read_text_file(f) for f in args.text]
    val = cli.read_text_file(args.val) if args.val else None
    return texts, val


def report_stopped(res: FitResult, hp: Hyper, out: Path, summary: dict, as_json: bool) -> int:
    cli.say(f"stopped after step {res.step} of {hp.steps} (--stop-after); training state saved in "
            f"{out / STATE_DIR}: run the same command again to resume", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        cli.emit_json(dict(summary, stopped=True))
    return 0


def summary_line(res: FitResult, hp: Hyper) -> str:
    parts = [f"{res.step} steps ({res.step * hp.tokens_per_step:,} tokens)"]
    if res.step > res.start_step:
        parts.append(f"{res.tokens_per_s(hp):,.0f} tokens/s over {res.train_s:.1f} s (+{res.compile_s:.1f} s compile)")
    if res.final_loss is not None:
        parts.append(f"final train loss {res.final_loss:.4f}")
    return "; ".join(parts)


def note(message: str) -> None:
    """A progress note on stderr (process 0 only)."""
    cli.say(message, file=sys.stderr)


def step_bar(hp: Hyper, label: str) -> StepBar | None:
    """The training progress line, on process 0."""
    return StepBar(hp.steps, label) if cli.is_main_process() else None
