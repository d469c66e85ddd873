"""The training loop: steps queued on the device, the host syncing only to log, evaluate and save; resumable."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import jax
import numpy as np

from lpjax.errors import LPJaxError
from lpjax.training.data import ValSet
from lpjax.training.optimizer import lr_at
from lpjax.training.programs import Programs, cast_tree, jax_tree_to_numpy
from lpjax.training.rundir import STATE_DIR, StateStore
from lpjax.training.settings import Cadence, Hyper


@dataclasses.dataclass
class FitResult:
    params: dict  # the whole model tree after training: trained parts float32, frozen parts as given
    start_step: int  # where this process started (0, or the resumed step)
    step: int  # where it ended
    completed: bool  # reached hp.steps (False: stopped by --stop-after)
    history: list  # (step, mean train loss since the previous entry)
    evals: list  # (step, val loss, val next-token accuracy) of the periodic and final evaluations
    final_val: dict | None
    train_s: float  # wall time of the steps alone (no compile, eval or saving)
    compile_s: float
    attention: str

    @property
    def final_loss(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def tokens_per_s(self, hp: Hyper) -> float:
        return (self.step - self.start_step) * hp.tokens_per_step / self.train_s if self.train_s > 0 else 0.0

    def summary(self, hp: Hyper) -> dict:
        """The JSON-ready facts of the run."""
        return {"steps": self.step, "tokens_seen": self.step * hp.tokens_per_step, "train_loss": self.final_loss,
                "tokens_per_s": round(self.tokens_per_s(hp), 1), "train_s": round(self.train_s, 2),
                "compile_s": round(self.compile_s, 2), "resumed_from": self.start_step, "completed": self.completed,
                "attention": self.attention, "history": [[s, round(v, 5)] for s, v in self.history],
                "evals": [[s, round(v, 5), round(a, 5)] for s, v, a in self.evals]}


class Progress(Protocol):
    """How the loop reports: `show` a step's loss, tokens/s and learning rate; `note` a line; `close` at the end."""

    def show(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None: ...

    def note(self, message: str) -> None: ...

    def close(self) -> None: ...


def fit(programs: Programs, params: dict, stream: np.ndarray, val: ValSet | None, out: Path, cadence: Cadence,
        bar: Progress | None = None, say: Callable[[str], None] | None = None) -> FitResult:
    """Train `programs.trainable` parts of `params` (a float32 model tree) on `stream`, resuming from the newest
    state under OUT/train_state if there is one. Frozen parts are never touched (a distillation teacher keeps its
    own copy of the original weights of the layers that train). `bar` shows progress; without it notes go to `say`
    (if given)."""
    hp = programs.hp
    store = StateStore(out, cadence.keep, hp.seed)
    trainable, frozen = programs.split(params)
    frozen_c = programs.put(cast_tree(frozen, programs.compute))
    teacher_c = programs.put(cast_tree(programs.teacher_part(params), programs.compute))
    start = store.latest()
    t0 = time.perf_counter()
    if start is None:
        start, state = 0, programs.init_state(trainable)
    else:
        if start > hp.steps:
            raise LPJaxError(f"{out / STATE_DIR}: holds step {start}, past --steps {hp.steps}")
        state = store.restore(start, programs.abstract_state(trainable))
        if int(state["step"]) != start:
            raise LPJaxError(f"{out / STATE_DIR}/{start}: holds the state of step {int(state['step'])}")
        (bar.note if bar else say or _quiet)(f"resuming from step {start} of {hp.steps} ({out / STATE_DIR})")
    stream_d = programs.put(stream)
    step_fn = programs.step(state, frozen_c, teacher_c, stream_d)
    evaluate = programs.evaluator(val, state["params"], frozen_c) if val is not None else None
    compile_s = time.perf_counter() - t0

    say = bar.note if bar else say or _quiet
    history, evals, pending = [], [], []
    train_s, step, mark, mark_step = 0.0, start, time.perf_counter(), start

    def sync() -> None:
        """Wait for the queued steps; log their mean loss."""
        nonlocal pending, train_s, mark, mark_step
        if not pending:
            return
        losses = np.asarray(jax.device_get(pending), np.float64)
        now = time.perf_counter()
        train_s += now - mark
        loss = float(losses.mean())
        history.append((step, loss))
        if bar:
            bar.show(step, loss, (step - mark_step) * hp.tokens_per_step / max(now - mark, 1e-9), lr_at(hp, step - 1))
        pending, mark, mark_step = [], now, step

    def restart_clock() -> None:
        nonlocal mark, mark_step
        mark, mark_step = time.perf_counter(), step

    try:
        while step < hp.steps:
            state, loss = step_fn(state, frozen_c, teacher_c, stream_d)
            step += 1
            pending.append(loss)
            is_eval = evaluate is not None and cadence.eval_every and step % cadence.eval_every == 0 and step < hp.steps
            is_save = cadence.save_every and step % cadence.save_every == 0
            stop = cadence.stop_after and step >= cadence.stop_after and step < hp.steps
            if step % cadence.log_every == 0 or is_eval or is_save or stop or step == hp.steps:
                sync()
            if is_eval:
                res = evaluate(state["params"], frozen_c)
                evals.append((step, res["loss"], res["accuracy"]))
                say(f"step {step}: val loss {res['loss']:.4f} (ppl {res['ppl']:.2f}, next-token accuracy "
                    f"{res['accuracy']:.4f})")
                restart_clock()
            if is_save or stop:
                store.save(step, state)
                restart_clock()
            if stop:
                break
        sync()
    except KeyboardInterrupt:
        try:  # label the save by the state's own step: the interrupt may have come between a step and the count
            done = int(state["step"])
            store.save(done, state)
            say(f"interrupted: training state of step {done} saved; run the same command to resume")
        except Exception:  # noqa: BLE001 -- the state was donated to a step cut short; the last save stands
            say("interrupted: run the same command to resume from the last saved step")
        raise
    finally:
        if bar:
            bar.close()
    completed = step >= hp.steps
    final_val = None
    if completed:
        store.save(step, state)
        if evaluate is not None:
            final_val = evaluate(state["params"], frozen_c)
            evals.append((step, final_val["loss"], final_val["accuracy"]))
    store.close()
    trained = jax_tree_to_numpy(state["params"])
    return FitResult(dict(params, **trained), start, step, completed, history, evals, final_val, train_s, compile_s,
                     programs.attention)


def _quiet(message: str) -> None:
    """Progress notes nobody asked for."""
