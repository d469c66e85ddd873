"""The plan as data: one compiled forward that scores every LP plan of a model, the plan an input array.

The engine's forward has its plan built in (stages stacked at load time, one XLA program per plan), so scoring a new
plan there costs a re-stack of the weights and a compile, which on a GPU is far longer than a pass over thousands of
tokens. Here the weights stay as sequential layers, stacked on one leading axis, and a `lax.scan` over the layers
reads, per layer, what the plan makes of it (`layer_kinds`): a sequential layer runs as the model's stage of one
layer; the first layer of a pair passes the stream on unchanged; the second runs the model's pair stage on the
weights of both (a slice of two layers of the stack), on that same input. A `lax.switch` picks the branch, so only
its computation runs. Every piece is the model's own (`model.stage_block`, the embedding and the head of `LlamaLM`),
so the logits are the structural forward's (tests/test_plan_data.py).

No KV cache and one device (a 1x1 mesh): it serves scoring (`quality.search`), where the engine's path stays the one
for other settings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lpjax.compile import CompileCache
from lpjax.engine import Engine, next_token_scores
from lpjax.errors import LPJaxError
from lpjax.model import FULL, LlamaLM, Positions, stage_block
from lpjax.plan import LPPlan
from lpjax.sharding import Layout
from lpjax.weights import retarget

SEQUENTIAL, FIRST, SECOND = 0, 1, 2  # what the plan makes of a layer (`layer_kinds`)
GLOBALS = ("embed", "norm", "lm_head")  # the model tree's plan-independent leaves


def layer_kinds(plan: LPPlan) -> np.ndarray:
    """[n_layers] int32: SEQUENTIAL, or FIRST / SECOND of an LP pair."""
    kinds = np.full(plan.n_layers, SEQUENTIAL, np.int32)
    for a, b in plan.pairs:
        kinds[a], kinds[b] = FIRST, SECOND
    return kinds


def unsupported(engine: Engine) -> str | None:
    """Why the plan-as-data forward cannot run for `engine`, or None when it can."""
    n = engine.layout.n_devices
    if n != 1:
        return f"the plan-as-data forward runs on one device, and this engine's mesh has {n}"
    if engine.config.n_layers < 2:
        return "the plan-as-data forward needs a model of at least 2 layers (one LP pair)"
    return None


class PlanForward:
    """The forward of `engine`'s weights under any plan of its model, compiled once per batch shape.

    `stacked`: every per-layer leaf of the sequential model's tree, [n_layers, ...] (one copy, made once);
    `globals`: the embedding, final norm and LM head, as the engine holds them."""

    def __init__(self, engine: Engine):
        if (why := unsupported(engine)) is not None:
            raise LPJaxError(why)
        self.engine, self.config = engine, engine.config
        n = self.config.n_layers
        self.layout = Layout.build(self.config, LPPlan(n), engine.mesh)  # sequential: stage i is layer i
        pair = Layout.build(self.config, LPPlan(n, ((0, 1),)), engine.mesh).stages[0]
        self._blocks = tuple(stage_block(self.layout, s, False, engine.dtype, engine.attention)
                             for s in (self.layout.stages[0], pair))
        self.globals = {k: engine.params[k] for k in GLOBALS if k in engine.params}

        def stack(params):
            tree = retarget(params, engine.layout, self.layout)  # slices and copies only: exact
            return jax.tree.map(lambda *layers: jnp.concatenate(layers), *(tree[f"layer_{i}"] for i in range(n)))

        self.stacked = jax.jit(stack)(engine.params)
        self.compiled = CompileCache()

    @property
    def compiles(self) -> int:
        """Programs compiled so far (one per batch shape and output kind, never one per plan)."""
        return len(self.compiled.programs)

    def _logits(self, globals_, stacked, kinds, tokens, pad):
        """Logits [B, T, V] (float32) of a full causal forward under the plan `kinds` [n_layers]."""
        lay = self.layout
        pos = Positions.prompt(pad, tokens.shape[1])
        x, _ = LlamaLM(lay, span=(0, 0)).apply({"params": globals_}, tokens, pos)  # the embedding only
        single, pair = self._blocks

        def layers(start, size):
            return jax.tree.map(lambda w: jax.lax.dynamic_slice_in_dim(w, start, size), stacked)

        def step(x, layer):
            i, kind = layer
            branches = (lambda x: single.apply({"params": layers(i, 1)}, x, None, pos, FULL)[0],
                        lambda x: x,  # the first layer of a pair: its pair runs at the second, on this input
                        lambda x: pair.apply({"params": layers(i - 1, 2)}, x, None, pos, FULL)[0])
            return jax.lax.switch(kind, branches, x), None

        x, _ = jax.lax.scan(step, x, (jnp.arange(self.config.n_layers), kinds))
        n = len(lay.stages)
        logits, _ = LlamaLM(lay, span=(n, n)).apply({"params": globals_}, x, pos)  # final norm and LM head
        return logits

    def _run(self, name: str, post, plan: LPPlan, tokens: np.ndarray) -> np.ndarray:
        if plan.n_layers != self.config.n_layers:
            raise LPJaxError(f"LP plan is for {plan.n_layers} layers but the model has {self.config.n_layers}")
        tokens = np.asarray(tokens, np.int32)
        B, T = tokens.shape
        put = self.engine.programs.put

        def run(globals_, stacked, kinds, tokens, pad):
            return post(self._logits(globals_, stacked, kinds, tokens, pad), tokens)

        args = (self.globals, self.stacked, put(layer_kinds(plan)), put(tokens), put(np.zeros(B, np.int32)))
        return self.engine.programs.get(self.compiled.get((name, B, T), lambda: jax.jit(run), args)(*args))

    def logits(self, plan: LPPlan, tokens: np.ndarray) -> np.ndarray:
        """Logits [B, T, V] (float32) of `tokens` [B, T] under `plan`, as `Engine.logits` of that plan's engine."""
        return self._run("logits", lambda logits, t: logits, plan, tokens)

    def token_scores(self, plan: LPPlan, tokens: np.ndarray) -> np.ndarray:
        """[B, T-1, 2] under `plan`, as `Engine.token_scores` of that plan's engine."""
        return self._run("scores", next_token_scores, plan, tokens)

    def under(self, plan: LPPlan) -> PlanView:
        """This forward under one plan, with the engine's `token_scores` (what `quality.perplexity` calls)."""
        return PlanView(self, plan)


@dataclasses.dataclass(frozen=True)
class PlanView:
    """A `PlanForward` under one plan: what `quality.perplexity.perplexity` scores, as it scores an engine."""

    forward: PlanForward
    plan: LPPlan

    def token_scores(self, tokens: np.ndarray) -> np.ndarray:
        return self.forward.token_scores(self.plan, tokens)
