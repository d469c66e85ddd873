"""The compiled training step and evaluation, and the model-tree helpers they need (fresh weights, casting)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.compile import CompileCache, resolve_attention
from lpjax.config import ModelConfig
from lpjax.errors import LPJaxError
from lpjax.model import FULL, LlamaLM, Positions
from lpjax.plan import LPPlan
from lpjax.schema import BY_NAME, global_shapes, layer_shapes
from lpjax.sharding import Layout, make_mesh
from lpjax.training.data import ValSet, sample_windows
from lpjax.training.optimizer import make_optimizer
from lpjax.training.settings import LM, Hyper, Objective
from lpjax.weights import assemble_globals, assemble_stage, retarget

_PROGRAMS = CompileCache()  # one compiled program per (what, layout, settings, shapes): runs in one process share them
XLA_OPTIONS: dict = {}  # extra XLA compiler options for the step and eval programs (tests compile faster with them)


def data_mesh(devices: int | None):
    """A 1-D ("data",) mesh over the first `devices` devices (default: all)."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise LPJaxError(f"--devices {n}: between 1 and the {len(available)} visible device(s)")
    return Mesh(np.array(available[:n]), ("data",))


def single_device_layout(config: ModelConfig, plan: LPPlan) -> Layout:
    """The plan's layout for one device: the model tree `LlamaLM(per_device=False)` takes (no KV-head repeats)."""
    return Layout.build(config, plan, make_mesh(1))


def init_params(layout, seed: int) -> dict:
    """Fresh float32 weights in the layout's model tree, initialised as the schema says (`Weight.init`). Drawn
    per canonical weight from (seed, layer, name), so the same seed gives the same model under any plan."""
    c = layout.config

    def draw(shapes: dict, layer: int) -> dict:
        w = {}
        for name, shape in shapes.items():
            rng = np.random.default_rng([seed, layer + 1, zlib.crc32(name.encode())])
            init = BY_NAME[name].init(c)
            if not init.std:
                w[name] = np.full(shape, init.fill, np.float32)
            else:
                w[name] = (init.std * rng.standard_normal(shape)).astype(np.float32)
        return w

    params = assemble_globals(layout, draw(global_shapes(c), -1))
    for s in layout.stages:
        params[s.name] = assemble_stage(s, c, [draw(layer_shapes(c), i) for i in s.stage.layers])
    return jax_tree_to_numpy(params)


def jax_tree_to_numpy(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def cast_tree(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def forward_logits(model, params, inputs):
    """float32 logits [B, T, V] of a causal pass over `inputs` [B, T] (params already in the compute dtype)."""
    B, T = inputs.shape
    logits, _ = model.apply({"params": params}, inputs, Positions.prompt(jnp.zeros((B,), jnp.int32), T), None, FULL)
    return logits


def token_kl(student_logits, teacher_logits, temperature: float):
    """KL(teacher || student) [B, T] of the next-token distributions softened by `temperature`, times its square
    (Hinton et al.: the soft targets' gradients shrink as 1/T^2, so the scale keeps them comparable across T)."""
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * temperature**2


class Programs:
    """The jitted training step and evaluation for one layout, settings and device set."""

    def __init__(self, layout, hp: Hyper, trainable: frozenset, mesh, attention: str = "auto",
                 note: Callable[[str], None] | None = None, objective: Objective = LM):
        self.layout, self.hp, self.trainable, self.mesh = layout, hp, frozenset(trainable), mesh
        objective.check()
        self.objective = objective
        n = mesh.devices.size
        if hp.batch_size % n:
            raise LPJaxError(f"--batch-size {hp.batch_size}: must be divisible by the {n} device(s) it is split over "
                             "(or choose --devices)")
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.compute = jnp.dtype(hp.compute_dtype)
        self.platform = mesh.devices.flat[0].platform
        self.automatic = attention == "auto"
        self.note = note  # told when automatic cuDNN attention falls back to XLA's
        self.attention = resolve_attention(attention, self.platform, hp.compute_dtype)
        self.tx = make_optimizer(hp)

    def model(self, attention: str, layout=None):
        return LlamaLM(layout or self.layout, per_device=False, param_dtype=self.compute, attention_impl=attention)

    def teacher_layout(self):
        """The sequential model's layout: the teacher of distillation."""
        return single_device_layout(self.layout.config, LPPlan(self.layout.config.n_layers))

    def teacher_part(self, params: dict) -> dict:
        """What the teacher holds that the frozen part does not: the original weights, as sequential layers, of
        the layers that train (its other layers and the globals are the frozen part itself)."""
        if not self.objective.distill:
            return {}
        teacher = retarget(params, self.layout, self.teacher_layout())
        trained = {i for s in self.layout.stages if s.name in self.trainable for i in s.stage.layers}
        return {k: v for k, v in teacher.items() if k in {f"layer_{i}" for i in trained}}

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

    def _compile(self, what: str, build: Callable[[str], Callable], args: tuple):
        """(compiled `build(attention)` for `args`, the attention used), shared by every run in this process."""
        shapes = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args))
        key = (what, self.layout, self.hp, self.objective if what == "step" else None, self.trainable,
               tuple(d.id for d in self.mesh.devices.flat), shapes, tuple(sorted(XLA_OPTIONS.items())))
        return _PROGRAMS.get_attention(key, build, args, self.attention, self.automatic, dict(XLA_OPTIONS), self.note)

    def step(self, state, frozen, teacher, stream):
        """The compiled step: (state, frozen params and the teacher's own part (`teacher_part`), both in the compute
        dtype, token stream) -> (state, loss). Under distillation the teacher's logits come from one forward of its
        frozen weights in the same program, outside the gradient; training windows are cut from the stream, so
        every token is real text and the loss is the mean over all of them."""
        hp, objective = self.hp, self.objective

        def build(attention: str):
            model = self.model(attention)
            teacher_model = self.model(attention, self.teacher_layout()) if objective.distill else None

            def loss_fn(trainable, frozen, inputs, targets, teacher_logits):
                logits = forward_logits(model, dict(frozen, **cast_tree(trainable, self.compute)), inputs)
                if objective.distill:
                    return token_kl(logits, teacher_logits, objective.temperature).mean()
                return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

            def step(state, frozen, teacher, stream):
                tokens = sample_windows(stream, hp.seed, state["step"], hp.batch_size, hp.seq_len + 1)
                tokens = jax.lax.with_sharding_constraint(tokens, self.batch_sharding)
                inputs, targets = tokens[:, :-1], tokens[:, 1:]
                teacher_logits = None
                if objective.distill:
                    teacher_logits = jax.lax.stop_gradient(
                        forward_logits(teacher_model, dict(frozen, **teacher), inputs))
                loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, inputs, targets, teacher_logits)
                updates, opt = self.tx.update(grads, state["opt"], state["params"])
                params = optax.apply_updates(state["params"], updates)
                return {"step": state["step"] + 1, "params": params, "opt": opt}, loss

            return jax.jit(step, donate_argnums=0, out_shardings=self.replicated)

        fn, self.attention = self._compile("step", build, (state, frozen, teacher, stream))
        return fn

    def evaluator(self, val: ValSet, trainable, frozen) -> Callable[[dict, dict], dict]:
        """A function (trainable float32, frozen compute-dtype) -> mean NLL, perplexity and next-token accuracy (how
        often the most likely token is the next one) over `val`, in one compiled program that scans the val
        batches. Whatever the objective, the model is judged on the text."""
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

                def one(totals, batch):
                    t, m = batch
                    logits = forward_logits(model, params, t[:, :-1])
                    nll = optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:])
                    hit = (jnp.argmax(logits, axis=-1) == t[:, 1:]).astype(jnp.float32)
                    return (totals[0] + (nll * m).sum(), totals[1] + (hit * m).sum()), None

                totals, _ = jax.lax.scan(one, (jnp.float32(0), jnp.float32(0)), (tokens, mask))
                return totals

            return jax.jit(run, out_shardings=self.replicated)

        args = (trainable, frozen, tokens, mask)
        fn, self.attention = self._compile("eval", build, args)
        count = val.n_tokens

        def evaluate(trainable, frozen) -> dict:
            total, hits = (float(x) for x in fn(trainable, frozen, tokens, mask))
            nll = total / count
            return {"loss": nll, "ppl": math.exp(min(nll, 700.0)), "accuracy": hits / count, "tokens": count}

        return evaluate
