"""`python -m lpjax.train`: train a small Llama from scratch on local text, and the training loop that
`lpjax.finetune` shares.

The loss is next-token cross-entropy over random windows of `--seq-len` + 1 tokens cut from one long token stream
(each training file tokenised with BOS and closed with EOS, then joined). Window starts depend only on `--seed` and
the step number and are drawn on the device, so a resumed run sees exactly the batches an uninterrupted one would,
and no data crosses from the host during training.

Parameters live in the lpjax model tree of the plan's layout on one device (`LlamaLM(local=False)`), kept in
float32 with float32 AdamW state; the loss casts them to the compute dtype (bfloat16 by default). With several
devices the batch is split over them (data parallelism) and the parameters replicated; `jit` inserts the gradient
all-reduce. Training state is saved with Orbax under OUT/train_state (atomically, the last few steps kept), so
re-running the same command into the same OUT resumes where the last save left off. The trained model is written
to OUT in lpjax's converted format (canonical per-layer weights, HF `config.json`, tokenizer files), so
`python -m lpjax.generate --model OUT` and `python -m lpjax.eval --model OUT` load it as they load any model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax import cli
from lpjax.checkpoint import MARKER, copy_tokenizer, is_converted, write_checkpoint
from lpjax.config import ModelConfig, round_up
from lpjax.errors import LPJaxError
from lpjax.eval import windows
from lpjax.model import INIT_STD, LlamaLM, Positions
from lpjax.plan import LPPlan
from lpjax.sharding import Layout, make_mesh
from lpjax.tokenizer import has_tokenizer, load_tokenizer
from lpjax.weights import (
    DTYPES,
    assemble_globals,
    assemble_stage,
    disassemble_globals,
    disassemble_stage,
    global_shapes,
    layer_shapes,
)

RUN_MARKER = "train_run.json"  # the setup of the run whose state OUT/train_state holds
STATE_DIR = "train_state"
RUN_FORMAT = "lpjax-train-v1"
DECAYED = ("wqkv", "wo", "w_gate_up", "w_down", "embedding", "lm_head")  # matrices; norms and biases are not decayed
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


# ----------------------------------------------------------------------------------------------------------------
# Settings


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
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise LPJaxError(f"--compute-dtype {self.compute_dtype}: choose bfloat16 or float32")

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
class ValSet:
    """Fixed held-out windows: `tokens` [N, T+1] (input = the first T, targets = the last T), `mask` [N, T] marks
    the scored targets. Scored as `lpjax.eval --window T --stride T-1` scores: every token after a file's first
    exactly once."""

    tokens: np.ndarray
    mask: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


# ----------------------------------------------------------------------------------------------------------------
# Data


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All training texts as one int32 stream: each tokenised with the tokenizer's BOS, followed by EOS."""
    eos = list(tokenizer.eos_ids[:1])
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.extend(eos)
    return np.asarray(ids, np.int32)


def sample_windows(stream, seed: int, step, batch: int, length: int):
    """`batch` windows of `length` tokens at random starts drawn from (seed, step) alone (threefry, the same on every
    platform). Traceable: the training step calls it on the device."""
    key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), step)
    starts = jax.random.randint(key, (batch,), 0, stream.shape[0] - length + 1)
    return stream[starts[:, None] + jnp.arange(length)]


def val_windows(texts: list[list[int]], seq_len: int, limit: int = 0) -> ValSet:
    """Windows of `seq_len` tokens, `seq_len - 1` apart, over each tokenised text (see `ValSet`); `limit` > 0 keeps
    that many of them, evenly spaced."""
    rows, masks = [], []
    for ids in texts:
        for begin, end, first in windows(len(ids), seq_len, seq_len - 1):
            row = np.zeros(seq_len + 1, np.int32)
            row[: end - begin] = ids[begin:end]
            mask = np.zeros(seq_len, np.float32)
            mask[first - begin - 1 : end - begin - 1] = 1.0
            rows.append(row)
            masks.append(mask)
    if limit and len(rows) > limit:
        keep = np.linspace(0, len(rows) - 1, limit).round().astype(int)
        rows, masks = [rows[i] for i in keep], [masks[i] for i in keep]
    return ValSet(np.stack(rows), np.stack(masks))


def unigram_nll(stream: np.ndarray, val: ValSet, vocab: int) -> float:
    """Mean NLL of the scored val tokens under the training stream's token frequencies (add-one smoothed): the
    baseline a model must beat by far."""
    counts = np.bincount(stream, minlength=vocab).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab))
    targets = val.tokens[:, 1:]
    return float(-(logp[targets] * val.mask).sum() / val.mask.sum())


def text_digest(texts: list[str]) -> list[str]:
    return [hashlib.sha256(t.encode("utf-8")).hexdigest()[:16] for t in texts]


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    """A byte-level BPE tokenizer trained on `texts` (special tokens <unk>, <s>, </s>; <s> prepended), saved in `out`
    as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise LPJaxError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((line for t in texts for line in t.splitlines(keepends=True)), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))


# ----------------------------------------------------------------------------------------------------------------
# Model pieces


def data_mesh(devices: int | None):
    """A 1-D ("data",) mesh over the first `devices` devices (default: all)."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise LPJaxError(f"--devices {n}: between 1 and the {len(available)} visible device(s)")
    return Mesh(np.array(available[:n]), ("data",))


def single_device_layout(config: ModelConfig, plan: LPPlan) -> Layout:
    """The plan's layout for one device: the model tree `LlamaLM(local=False)` takes (no KV-head repeats)."""
    return Layout.build(config, plan, make_mesh(1))


def init_params(layout, seed: int) -> dict:
    """Fresh float32 weights in the layout's model tree: matrices N(0, 0.02), the residual-writing projections (wo,
    w_down) scaled by 1/sqrt(2 * layers) as in GPT-2, norms 1, biases 0. Drawn per canonical weight from (seed,
    layer, name), so the same seed gives the same model under any plan."""
    c = layout.config
    out_std = INIT_STD / math.sqrt(2 * c.n_layers)

    def draw(shapes: dict, layer: int) -> dict:
        w = {}
        for name, shape in shapes.items():
            rng = np.random.default_rng([seed, layer + 1, zlib.crc32(name.encode())])
            if "norm" in name:
                w[name] = np.ones(shape, np.float32)
            elif name.startswith("b"):
                w[name] = np.zeros(shape, np.float32)
            else:
                std = out_std if name in ("wo", "w_down") else INIT_STD
                w[name] = (std * rng.standard_normal(shape)).astype(np.float32)
        return w

    params = assemble_globals(layout, draw(global_shapes(c), -1))
    for s in layout.stages:
        params[s.name] = assemble_stage(s, c, [draw(layer_shapes(c), i) for i in s.stage.layers])
    return jax_tree_to_numpy(params)


def jax_tree_to_numpy(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def lr_schedule(hp: Hyper):
    """Learning rate by update count: linear warm-up from 0, then cosine decay to lr * min_lr_ratio."""
    return optax.warmup_cosine_decay_schedule(0.0, hp.lr, hp.warmup, hp.steps, hp.lr * hp.min_lr_ratio)


def make_optimizer(hp: Hyper):
    """Global-norm clipping, then AdamW (decay on matrices only) under `lr_schedule`."""
    schedule = lr_schedule(hp)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)

    return optax.chain(
        optax.clip_by_global_norm(hp.clip) if hp.clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=hp.b1, b2=hp.b2, weight_decay=hp.weight_decay, mask=decay_mask),
    )


def cast_tree(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def token_nll(model, params, tokens):
    """NLL [B, T] of tokens[:, 1:] given tokens[:, :-1] (params already in the compute dtype)."""
    inputs = tokens[:, :-1]
    B, T = inputs.shape
    logits, _ = model.apply({"params": params}, inputs, Positions.prompt(jnp.zeros((B,), jnp.int32), T), None,
                            "full")
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


# ----------------------------------------------------------------------------------------------------------------
# Compiled programs


def resolve_attention(requested: str, platform: str, compute_dtype: str) -> str:
    if requested != "auto":
        return requested
    return "cudnn" if platform == "gpu" and compute_dtype == "bfloat16" else "xla"


_COMPILED: dict = {}  # one compiled program per (what, layout, settings, shapes): runs in one process share them
XLA_OPTIONS: dict = {}  # extra XLA compiler options for the step and eval programs (tests compile faster with them)


def compile_program(key, build: Callable[[str], Callable], args: tuple, attention: str, automatic: bool):
    """Compile `build(attention)` for `args` (cached). cuDNN attention picked automatically falls back to XLA's
    if it does not compile here. Returns (compiled, attention used)."""
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args))
    for impl in (attention, "xla") if attention == "cudnn" else (attention,):
        full = (key, impl, shapes, tuple(sorted(XLA_OPTIONS.items())))
        if full in _COMPILED:
            return _COMPILED[full], impl
        try:
            _COMPILED[full] = build(impl).lower(*args).compile(compiler_options=dict(XLA_OPTIONS) or None)
            return _COMPILED[full], impl
        except Exception as e:  # noqa: BLE001 -- any compile failure of the cuDNN kernel means: use XLA's
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            if impl != "cudnn":
                raise
            if not automatic:
                raise LPJaxError(f"--attention cudnn: does not compile here ({first})") from None
            cli.say(f"note: cuDNN attention does not compile here ({first[:160]}); using XLA attention",
                    file=sys.stderr)
    raise AssertionError("unreachable")


class Programs:
    """The jitted training step and evaluation for one layout, settings and device set."""

    def __init__(self, layout, hp: Hyper, trainable: frozenset, mesh, attention: str = "auto"):
        self.layout, self.hp, self.trainable, self.mesh = layout, hp, frozenset(trainable), mesh
        n = mesh.devices.size
        if hp.batch_size % n:
            raise LPJaxError(f"--batch-size {hp.batch_size}: must be divisible by the {n} device(s) it is split over "
                             "(or choose --devices)")
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.compute = jnp.dtype(hp.compute_dtype)
        self.platform = mesh.devices.flat[0].platform
        self.automatic = attention == "auto"
        self.attention = resolve_attention(attention, self.platform, hp.compute_dtype)
        self.tx = make_optimizer(hp)

    def model(self, attention: str):
        return LlamaLM(self.layout, local=False, param_dtype=self.compute, attention_impl=attention)

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) top-level parts of a model tree."""
        return ({k: v for k, v in params.items() if k in self.trainable},
                {k: v for k, v in params.items() if k not in self.trainable})

    def init_state(self, trainable: dict) -> dict:
        fn = jax.jit(lambda p: {"step": jnp.int32(0), "params": p, "opt": self.tx.init(p)},
                     out_shardings=self.replicated)
        return fn(jax.device_put(trainable, self.replicated))

    def abstract_state(self, trainable: dict) -> dict:
        shapes = jax.eval_shape(lambda p: {"step": jnp.int32(0), "params": p, "opt": self.tx.init(p)},
                                trainable)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), shapes)

    def put(self, tree, sharding=None):
        return jax.device_put(tree, sharding or self.replicated)

    def _key(self, what: str):
        return (what, self.layout, self.hp, self.trainable, tuple(d.id for d in self.mesh.devices.flat))

    def step(self, state, frozen, stream):
        """The compiled step: (state, frozen params in the compute dtype, token stream) -> (state, loss)."""
        hp = self.hp

        def build(attention: str):
            model = self.model(attention)

            def loss_fn(trainable, frozen, tokens):
                params = dict(frozen, **cast_tree(trainable, self.compute))
                return token_nll(model, params, tokens).mean()

            def step(state, frozen, stream):
                tokens = sample_windows(stream, hp.seed, state["step"], hp.batch_size, hp.seq_len + 1)
                tokens = jax.lax.with_sharding_constraint(tokens, self.batch_sharding)
                loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, tokens)
                updates, opt = self.tx.update(grads, state["opt"], state["params"])
                params = optax.apply_updates(state["params"], updates)
                return {"step": state["step"] + 1, "params": params, "opt": opt}, loss

            return jax.jit(step, donate_argnums=0, out_shardings=self.replicated)

        fn, self.attention = compile_program(self._key("step"), build, (state, frozen, stream), self.attention,
                                             self.automatic)
        return fn

    def evaluator(self, val: ValSet, trainable, frozen) -> Callable[[dict, dict], dict]:
        """A function (trainable float32, frozen compute-dtype) -> mean NLL and perplexity over `val`, in one
        compiled program that scans the val batches."""
        B = self.hp.batch_size
        n = len(val.tokens)
        rows = -(-n // B) * B
        tokens = np.zeros((rows, val.tokens.shape[1]), np.int32)
        mask = np.zeros((rows, val.mask.shape[1]), np.float32)
        tokens[:n], mask[:n] = val.tokens, val.mask
        sh = NamedSharding(self.mesh, P(None, "data"))
        tokens = jax.device_put(tokens.reshape(rows // B, B, -1), sh)
        mask = jax.device_put(mask.reshape(rows // B, B, -1), sh)

        def build(attention: str):
            model = self.model(attention)

            def run(trainable, frozen, tokens, mask):
                params = dict(frozen, **cast_tree(trainable, self.compute))

                def one(total, batch):
                    t, m = batch
                    return total + (token_nll(model, params, t) * m).sum(), None

                total, _ = jax.lax.scan(one, jnp.float32(0), (tokens, mask))
                return total

            return jax.jit(run, out_shardings=self.replicated)

        args = (trainable, frozen, tokens, mask)
        fn, self.attention = compile_program(self._key("eval"), build, args, self.attention, self.automatic)
        count = val.n_tokens

        def evaluate(trainable, frozen) -> dict:
            nll = float(fn(trainable, frozen, tokens, mask)) / count
            return {"loss": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": count}

        return evaluate


# ----------------------------------------------------------------------------------------------------------------
# Run directory and training state


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


def start_run(out: Path, setup: dict, tokenizer_dir: Path | None) -> None:
    """Empty OUT (`check_run` allowed it), record the setup there, and put the tokenizer files in."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    (out / RUN_MARKER).write_text(json.dumps({"format": RUN_FORMAT, "setup": _normal(setup)}, indent=2,
                                             sort_keys=True) + "\n")


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
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise LPJaxError(f"{STATE_DIR}/{step}: does not match this run's model ({first})") from None
        if got.meta.get("data_seed") != self.seed or got.meta.get("step") != step:
            raise LPJaxError(f"{STATE_DIR}/{step}: saved with another seed or step ({got.meta})")
        return got.state


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class FitResult:
    params: dict  # the whole model tree after training: trained parts float32, frozen parts as given
    start_step: int  # where this process started (0, or the resumed step)
    step: int  # where it ended
    completed: bool  # reached hp.steps (False: stopped by --stop-after)
    history: list  # (step, mean train loss since the previous entry)
    evals: list  # (step, val loss) of the periodic and final evaluations
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
                "evals": [[s, round(v, 5)] for s, v in self.evals]}


def lr_at(hp: Hyper, count: int) -> float:
    """The learning rate of update `count` (0-based), for the progress bar."""
    return float(lr_schedule(hp)(count))


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


def fit(programs: Programs, params: dict, stream: np.ndarray, val: ValSet | None, out: Path, cadence: Cadence,
        show_progress: bool = True, label: str = "training") -> FitResult:
    """Train `programs.trainable` parts of `params` (a float32 model tree) on `stream`, resuming from the newest
    state under OUT/train_state if there is one. Frozen parts are never touched."""
    hp = programs.hp
    store = StateStore(out, cadence.keep, hp.seed)
    trainable, frozen = programs.split(params)
    frozen_c = programs.put(cast_tree(frozen, programs.compute))
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
        cli.say(f"resuming from step {start} of {hp.steps} ({out / STATE_DIR})", file=sys.stderr)
    stream_d = programs.put(stream)
    step_fn = programs.step(state, frozen_c, stream_d)
    evaluate = programs.evaluator(val, state["params"], frozen_c) if val is not None else None
    compile_s = time.perf_counter() - t0

    bar = StepBar(hp.steps, label) if show_progress else None
    say = bar.note if bar else (lambda message: cli.say(message, file=sys.stderr))
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
            state, loss = step_fn(state, frozen_c, stream_d)
            step += 1
            pending.append(loss)
            is_eval = evaluate is not None and cadence.eval_every and step % cadence.eval_every == 0 and step < hp.steps
            is_save = cadence.save_every and step % cadence.save_every == 0
            stop = cadence.stop_after and step >= cadence.stop_after and step < hp.steps
            if step % cadence.log_every == 0 or is_eval or is_save or stop or step == hp.steps:
                sync()
            if is_eval:
                res = evaluate(state["params"], frozen_c)
                evals.append((step, res["loss"]))
                say(f"step {step}: val loss {res['loss']:.4f} (ppl {res['ppl']:.2f})")
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
            evals.append((step, final_val["loss"]))
    store.close()
    trained = jax_tree_to_numpy(state["params"])
    return FitResult(dict(params, **trained), start, step, completed, history, evals, final_val, train_s, compile_s,
                     programs.attention)


# ----------------------------------------------------------------------------------------------------------------
# Writing the model


def hf_config_dict(config, dtype: str) -> dict:
    """A Hugging Face `LlamaConfig` dict for `config` (transformers can load it; every lpjax tool reads it)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": config.dim, "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tied_embeddings,
        "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias, "initializer_range": 0.02,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else list(config.eos_token_ids),
        "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
    }


def canonical_layers(layout, params: dict) -> tuple[dict, dict[int, dict]]:
    """(globals, {layer: weights}): the canonical weights of a model tree."""
    layers = {}
    for s in layout.stages:
        layers.update(zip(s.stage.layers, disassemble_stage(s, layout.config, params[s.name])))
    return disassemble_globals(layout, params), layers


def retarget(params: dict, layout, target) -> dict:
    """The same weights as a model tree of another plan's layout."""
    g, layers = canonical_layers(layout, params)
    out = assemble_globals(target, g)
    for s in target.stages:
        out[s.name] = assemble_stage(s, target.config, [layers[i] for i in s.stage.layers])
    return out


def canonical_items(layout, params: dict, dtype: str):
    """(layer or None, canonical weights as numpy in `dtype`) for every item of the converted format."""
    np_dtype = np.dtype(DTYPES[dtype])
    g, layers = canonical_layers(layout, params)
    yield None, {k: np.asarray(v).astype(np_dtype) for k, v in g.items()}
    for i in sorted(layers):
        yield i, {k: np.asarray(v).astype(np_dtype) for k, v in layers[i].items()}


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


# ----------------------------------------------------------------------------------------------------------------
# Command line


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
    g.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16",
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


def prepare_data(tokenizer, texts: list[str], val_text: str | None, hp: Hyper, val_limit: int):
    """(training stream, val windows or None), checking each is long enough to use."""
    stream = token_stream(tokenizer, texts)
    if len(stream) < hp.seq_len + 1:
        raise LPJaxError(f"--text: {len(stream)} tokens in all, shorter than one training window of --seq-len "
                         f"{hp.seq_len} + 1 tokens (give more text or a smaller --seq-len)")
    val = None
    if val_text is not None:
        ids = tokenizer.encode(val_text)
        if len(ids) < 2:
            raise LPJaxError("--val: has fewer than 2 tokens, nothing to score")
        val = val_windows([ids], hp.seq_len, val_limit)
    return stream, val


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lpjax.train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", type=Path, default=None,
                   help="directory with an HF tokenizer to use (default: train a byte-level BPE on --text)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="model vocabulary; the BPE trained here gets this many tokens (default 4096; with "
                        "--tokenizer: its size rounded up to a multiple of 64)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--dim", type=int, default=128)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    g.add_argument("--head-dim", type=int, default=None, help="default: dim / heads")
    g.add_argument("--ffn", type=int, default=None, help="MLP width (default: 8/3 dim rounded up to 64)")
    g.add_argument("--tie-embeddings", action="store_true", help="share the embedding with the LM head")
    g.add_argument("--rope-theta", type=float, default=10000.0)
    add_training_args(p, steps=1000, batch_size=32, lr=3e-3, warmup=100, weight_decay=0.1, seq_len=256)
    p.add_argument("--save-dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                   help="dtype of the written model (default bfloat16)")
    return p.parse_args(argv)


def model_config(args, vocab: int, bos: int | None, eos: int | None):
    if args.head_dim is None and args.heads > 0 and args.dim % args.heads:
        raise LPJaxError(f"--dim {args.dim} is not divisible by --heads {args.heads}: give --head-dim")
    return ModelConfig(
        vocab_size=vocab, dim=args.dim, ffn_dim=args.ffn or round_up(int(8 * args.dim / 3), 64),
        n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads,
        head_dim=args.head_dim or (args.dim // args.heads if args.heads > 0 else 0), norm_eps=1e-5,
        rope_theta=args.rope_theta, max_seq_len=args.seq_len, tied_embeddings=args.tie_embeddings,
        bos_token_id=bos, eos_token_ids=() if eos is None else (eos,),
    )


def tokenizer_setup(args) -> dict:
    if args.tokenizer is None:
        return {"trained_bpe": args.vocab_size or 4096}
    if not (args.tokenizer / "tokenizer.json").is_file() and not (args.tokenizer / "tokenizer.model").is_file():
        raise LPJaxError(f"--tokenizer {args.tokenizer}: no tokenizer.json or tokenizer.model there")
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (args.tokenizer / name).is_file():
            digest.update((args.tokenizer / name).read_bytes())
    return {"given": digest.hexdigest()[:16], "vocab_size": args.vocab_size}


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


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.enable_compile_cache()
    texts, val_text = read_texts(args)
    hp = hyper_from_args(args, args.seq_len)
    cadence = cadence_from_args(args)
    setup = {"kind": "train", "hyper": dataclasses.asdict(hp), "tokenizer": tokenizer_setup(args),
             "model": {k: getattr(args, k) for k in ("layers", "dim", "heads", "kv_heads", "head_dim", "ffn",
                                                     "tie_embeddings", "rope_theta", "vocab_size")},
             "text": text_digest(texts), "val": text_digest([val_text]) if val_text else None}
    out: Path = args.out
    resuming = check_run(out, setup, args.overwrite, args.resume)
    with tempfile.TemporaryDirectory(prefix="lpjax-tokenizer-") as scratch:
        if resuming and has_tokenizer(out):  # the run's own tokenizer, made when it started
            tok_dir = out
        elif args.tokenizer is None:
            cli.say(f"training a byte-level BPE tokenizer ({args.vocab_size or 4096} tokens) on --text",
                    file=sys.stderr)
            tok_dir = Path(scratch)
            train_tokenizer(texts, args.vocab_size or 4096, tok_dir)
        else:
            tok_dir = args.tokenizer
        tok = load_tokenizer(tok_dir, 0, ())
        n_tok = len(tok.tok)
        vocab = args.vocab_size or (4096 if args.tokenizer is None else round_up(n_tok, 64))
        if n_tok > vocab:
            raise LPJaxError(f"--vocab-size {vocab}: smaller than the tokenizer's {n_tok} tokens")
        config = model_config(args, vocab, tok.tok.bos_token_id, tok.tok.eos_token_id)
        layout = single_device_layout(config, LPPlan(config.n_layers))
        stream, val = prepare_data(tok, texts, val_text, hp, args.val_windows)
        mesh = data_mesh(args.devices)
        params = init_params(layout, hp.seed)
        programs = Programs(layout, hp, frozenset(params), mesh, args.attention)
        if not resuming:
            start_run(out, setup, tok_dir)
        elif tok_dir != out:  # resuming a run whose start was cut short before its tokenizer was saved
            copy_tokenizer(tok_dir, out)
    cli.say(f"[{'resuming' if resuming else 'training'} a {config.n_layers}-layer Llama, {config.n_params / 1e6:.2f}M "
            f"params, vocab {vocab}; {len(stream):,} training tokens; {hp.steps} steps of {hp.batch_size} x "
            f"{hp.seq_len} tokens on {mesh.devices.size} {programs.platform.upper()} device(s), "
            f"{hp.compute_dtype}]", file=sys.stderr)
    res = fit(programs, params, stream, val, out, cadence, cli.is_main_process())
    summary = dict(res.summary(hp), params=config.n_params, devices=mesh.devices.size, out=str(out))
    to = sys.stderr if args.json else sys.stdout
    if not res.completed:
        return report_stopped(res, hp, out, summary, args.json)
    write_model(out, layout, res.params, hf_config_dict(config, args.save_dtype), args.save_dtype,
                f"trained by lpjax.train ({res.step} steps)",
                {"kind": "train", "steps": res.step, "tokens": res.step * hp.tokens_per_step})
    line = "trained " + summary_line(res, hp)
    if val is not None:
        uni = unigram_nll(stream, val, vocab)
        summary.update(val_loss=res.final_val["loss"], val_ppl=res.final_val["ppl"], val_tokens=val.n_tokens,
                       unigram_ppl=math.exp(uni))
        line += (f"; val loss {res.final_val['loss']:.4f} (ppl {res.final_val['ppl']:.2f}) vs unigram ppl "
                 f"{math.exp(uni):.2f}")
    cli.say(line, file=to)
    cli.say(f"wrote {out}: load it with --model {out}", file=to)
    if args.json:
        cli.emit_json(summary)
    return 0


if __name__ == "__main__":
    cli.run(main)
