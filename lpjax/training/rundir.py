"""The run directory OUT: what run it holds (`check_run`, `start_run`: train_run.json, with the setup that decides the
run, its loss and its texts' digests among it), its training states (`StateStore`) and the trained model written in
lpjax's converted format (`write_model`, whose lpjax.json says again how it was trained)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lpjax.errors import LPJaxError, first_line
from lpjax.sources.converted import MARKER, is_converted, write_checkpoint
from lpjax.tokenizer import copy_tokenizer
from lpjax.weights import canonical_items

RUN_MARKER = "train_run.json"  # the setup of the run whose state OUT/train_state holds
STATE_DIR = "train_state"
RUN_FORMAT = "lpjax-train-v1"


def _normal(obj):
    """JSON-normal form (tuples become lists), so a saved setup compares equal to a fresh one."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _flat(d: dict, prefix: str = "") -> dict:
    """{"hyper": {"lr": x}} -> {"hyper.lr": x}, to name what differs."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_run(out: Path, setup: dict, overwrite: bool, resume: bool) -> bool:
    """What OUT is for, deciding nothing on disk yet: True to resume the run there (same setup), False for a new
    run (which `start_run` sets up once the inputs are known to be good)."""
    if resume and overwrite:
        raise LPJaxError("--resume and --overwrite contradict each other: choose one")
    marker = out / RUN_MARKER
    setup = _normal(setup)
    if marker.is_file() and not overwrite:
        try:
            saved = json.loads(marker.read_text()).get("setup") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            saved = {}
        if saved == setup:
            return True
        saved, now = _flat(saved), _flat(setup)
        diff = sorted(k for k in set(now) | set(saved) if saved.get(k) != now.get(k))
        show = "; ".join(f"{k} {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff[:3])
        raise LPJaxError(f"--out {out}: holds a training run of another setup ({show}); use another --out, or "
                         "--overwrite to start over there")
    if resume:
        raise LPJaxError(f"--resume: {out} holds no training run to resume")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise LPJaxError(f"--out {out}: already exists and is not empty (pass --overwrite to replace it, or "
                             "re-run the same command into it to resume its training run)")
        if not (marker.is_file() or is_converted(out)):
            raise LPJaxError(f"--out {out}: --overwrite only replaces an lpjax training run or checkpoint "
                             "directory, and this is not one")
    return False


def start_run(out: Path, setup: dict, tokenizer_dir: Path | None, about: dict | None = None) -> None:
    """Empty OUT (`check_run` allowed it), record the setup there, and put the tokenizer files in. `about` is
    recorded beside the setup for people (which loss, which text files and where they came from) and is not
    compared on resumption (a text file may move; its digest in the setup is what must match)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    record = {"format": RUN_FORMAT, "setup": _normal(setup)}
    if about:
        record["about"] = _normal(about)
    (out / RUN_MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


class StateStore:
    """Training states (step, float32 trainable params, optimizer state) under OUT/train_state, Orbax-managed:
    each save lands atomically (written aside, then renamed), the newest `keep` are kept."""

    def __init__(self, out: Path, keep: int, seed: int):
        import orbax.checkpoint as ocp

        self.ocp, self.seed = ocp, seed
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager((out / STATE_DIR).absolute(), options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict) -> None:
        if step in self.manager.all_steps():
            return
        args = self.ocp.args
        self.manager.save(step, args=args.Composite(state=args.StandardSave(state),
                                                    meta=args.JsonSave({"step": step, "data_seed": self.seed})))
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def restore(self, step: int, abstract: dict) -> dict:
        args = self.ocp.args
        try:
            got = self.manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract),
                                                                 meta=args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise LPJaxError(f"{STATE_DIR}/{step}: does not match this run's model ({first_line(e)})") from None
        if got.meta.get("data_seed") != self.seed or got.meta.get("step") != step:
            raise LPJaxError(f"{STATE_DIR}/{step}: saved with another seed or step ({got.meta})")
        return got.state


def write_model(out: Path, layout, params: dict, hf_config: dict, dtype: str, provenance: str,
                training: dict) -> None:
    """Write the model in the converted format into OUT (replacing an earlier model there; the tokenizer files are
    already in OUT). `training` is recorded in lpjax.json."""
    (out / MARKER).unlink(missing_ok=True)  # the marker goes last: a half-written model is never taken for one
    if (out / "params").exists():
        shutil.rmtree(out / "params")
    write_checkpoint(out, hf_config, canonical_items(layout, params, dtype), dtype, provenance)
    meta = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps(dict(meta, training=training), indent=2) + "\n")
