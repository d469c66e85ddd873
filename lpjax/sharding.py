"""Device mesh and how every parameter and cache array is split over it (docs/design.md section 3).

One mesh with axes ("pair", "tp") of shape (2, N/2), or (1, 1) on one device.
- Sequential layers: Megatron tensor parallelism over all N devices (heads and MLP columns split over both axes).
- LP pairs: the stacked pair axis over "pair" (each device holds one layer of the pair), heads / MLP columns over
  "tp". The sum over the pair then rides on the same all-reduce as the tensor-parallel partial sums: 2 a pair.
- KV heads fewer than a stage's split are repeated at load time until each device owns one (exact: the repeated
  heads are copies).
- Embedding and LM head split over the vocabulary (padded to a multiple of N; padded logits are dropped).
- A quantized matrix's scales (and offsets) split like its values; a per-channel scale, one row for the whole
  input, is replicated along a split input (docs/design.md section 7).

`Layout` says how big each piece is and checks that the model divides; `ShardingRules` names the logical axes of
every array once and maps them to mesh axes per stage kind.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpjax.cache import StageCache
from lpjax.config import ModelConfig, round_up
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan, Stage
from lpjax.quantize import QuantizedWeight, part_specs
from lpjax.schema import GLOBAL_PARAMS, STAGE_PARAMS, WEIGHTS

MESH_AXES = ("pair", "tp")
ALL = MESH_AXES  # "every device": the axes a sequential layer, the vocabulary and each all-reduce span


def make_mesh(n_devices: int | None = None, devices: list | None = None) -> Mesh:
    """A ("pair", "tp") mesh over the first `n_devices` devices (default: all, across all processes)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices) if n_devices is None else n_devices
    if n > len(devices):
        raise LPJaxError(f"--devices {n}: only {len(devices)} {devices[0].platform.upper()} device(s) are visible")
    shape = grid_shape(n)
    try:  # topology-aware order (TPU slices, NVLink islands), as JAX lays meshes out itself
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices[:n])
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.array(devices[:n]).reshape(shape)
    return Mesh(grid, MESH_AXES)


def grid_shape(n: int) -> tuple[int, int]:
    """The ("pair", "tp") shape of a mesh of `n` devices, or the one-line reason there is none."""
    if n < 1:
        raise LPJaxError(f"--devices {n}: need at least one device")
    if n > 1 and n % 2:
        raise LPJaxError(
            f"--devices {n}: use 1 or an even number of devices (LP puts one layer of a pair on each half)")
    return (1, 1) if n == 1 else (2, n // 2)


def mesh_shape(mesh: Mesh) -> tuple[int, int]:
    return mesh.shape["pair"], mesh.shape["tp"]


def describe_mesh(mesh: Mesh) -> str:
    pair, tp = mesh_shape(mesh)
    d = mesh.devices.flat[0]
    return f"{pair * tp} {d.platform.upper()} device(s), mesh pair={pair} x tp={tp}"


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """Sizes of one stage: how many ways its heads / MLP columns are split, and its stored KV-head count."""

    stage: Stage
    split: int
    kv_heads: int
    kv_repeat: int

    @property
    def stack(self) -> int:
        return len(self.stage.layers)

    @property
    def name(self) -> str:
        return self.stage.name


@dataclasses.dataclass(frozen=True)
class Layout:
    config: ModelConfig
    plan: LPPlan
    pair_size: int
    tp_size: int
    stages: tuple[StageLayout, ...]
    vocab_padded: int

    @property
    def n_devices(self) -> int:
        return self.pair_size * self.tp_size

    @classmethod
    def build(cls, config: ModelConfig, plan: LPPlan, mesh: Mesh) -> Layout:
        return cls.of_grid(config, plan, *mesh_shape(mesh))

    @classmethod
    def for_devices(cls, config: ModelConfig, plan: LPPlan, n_devices: int) -> Layout:
        """The layout on `n_devices` devices, without a mesh (the PyTorch baselines split the model by it)."""
        return cls.of_grid(config, plan, *grid_shape(n_devices))

    @classmethod
    def of_grid(cls, config: ModelConfig, plan: LPPlan, pair: int, tp: int) -> Layout:
        """Each stage's split over a ("pair", "tp") grid, or the one-line reason the model does not divide."""
        n = pair * tp
        if plan.n_layers != config.n_layers:
            raise LPJaxError(f"LP plan is for {plan.n_layers} layers but the model has {config.n_layers}")
        stages = []
        for stage in plan.stages:
            split = tp if stage.is_pair else n
            what = f"{'LP pairs' if stage.is_pair else 'sequential layers'} (split {split} ways on {n} devices)"
            for dim, size in (("attention heads", config.n_heads), ("MLP width", config.ffn_dim)):
                if size % split:
                    raise LPJaxError(f"cannot split the model over {n} devices: {dim} {size} of {what} is not "
                                     f"divisible by {split}")
            kv = config.n_kv_heads
            if kv % split == 0:
                repeat = 1
            elif split % kv == 0:
                repeat = split // kv
            else:
                raise LPJaxError(
                    f"cannot split the model over {n} devices: {kv} KV heads of {what} neither divide nor are a "
                    f"divisor of {split}"
                )
            stages.append(StageLayout(stage, split, kv * repeat, repeat))
        return cls(config, plan, pair, tp, tuple(stages), round_up(config.vocab_size, n))


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axes of every array and their mesh axes, per stage kind (one place, as in jax-llm-examples)."""

    # Logical axes of the model tree's leaves and of the canonical weights: derived from lpjax/schema.py.
    stage_params: tuple[tuple[str, tuple], ...] = tuple((p.path, p.axes) for p in STAGE_PARAMS)
    layer_weights: tuple[tuple[str, tuple], ...] = tuple((w.name, w.axes) for w in WEIGHTS if w.per_layer)
    global_params: tuple[tuple[str, tuple], ...] = tuple((p.path, p.axes) for p in GLOBAL_PARAMS)
    cache: tuple = ("stack", None, "kv_heads", None, None)  # [stack, batch, kv_heads, max_len, head_dim]
    sequential: tuple[tuple[str, object], ...] = (("stack", None), ("heads", ALL), ("kv_heads", ALL), ("mlp", ALL))
    pair: tuple[tuple[str, object], ...] = (("stack", "pair"), ("heads", "tp"), ("kv_heads", "tp"), ("mlp", "tp"))
    vocab: object = ALL

    def _spec(self, logical: tuple, stage: StageLayout | None) -> P:
        rules = dict(self.pair if stage is not None and stage.stage.is_pair else self.sequential)
        rules["vocab"] = self.vocab
        return P(*(rules.get(a) if a is not None else None for a in logical))

    def param_specs(self, params: dict, layout: Layout) -> dict:
        """PartitionSpecs for a model parameter tree (same structure as `params`; arrays or abstract shapes). A
        quantized matrix gets one per part: its scales (and offsets) split like its values, except along the input
        when they have one row for all of it (per-channel scales), `quantize.part_spec`."""
        stage_axes, global_axes = dict(self.stage_params), dict(self.global_params)
        by_name = {s.name: s for s in layout.stages}

        def spec(path: str, leaf) -> P:
            top, _, rest = path.partition("/")
            if top in by_name:
                out = self._spec(stage_axes[rest], by_name[top])
            else:
                out = self._spec(global_axes[path], None)
            return part_specs(out, leaf) if isinstance(leaf, QuantizedWeight) else out

        return _map_named(params, spec)

    def layer_spec(self, name: str, stage: StageLayout) -> P:
        """Where a canonical weight of one of `stage`'s layers sits before stacking (an LP layer is held by both
        halves of the "pair" axis until stacking keeps one; KV weights to be repeated arrive replicated)."""
        logical = dict(self.layer_weights)[name]
        if stage.kv_repeat > 1 and "kv_heads" in logical:
            return P()
        return self._spec(logical, stage)

    def cache_specs(self, layout: Layout) -> dict[str, StageCache]:
        return {s.name: StageCache(k=self._spec(self.cache, s), v=self._spec(self.cache, s)) for s in layout.stages}


RULES = ShardingRules()


def _map_named(tree: dict, fn) -> dict:
    """Map `fn("a/b", leaf)` over the leaves of a nested dict, by their slash-joined path."""

    def go(t, prefix):
        return {k: go(v, f"{prefix}{k}/") if isinstance(v, dict) else fn(f"{prefix}{k}", v) for k, v in t.items()}

    return go(tree, "")


def named(mesh: Mesh, specs):
    """NamedShardings for a tree of PartitionSpecs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
