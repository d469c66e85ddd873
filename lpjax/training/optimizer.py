"""AdamW with global-norm clipping under a warm-up + cosine schedule; weight decay on the leaves the schema marks."""

from __future__ import annotations

import jax
import optax

from lpjax.schema import decayed_paths
from lpjax.training.settings import Hyper


def lr_schedule(hp: Hyper):
    """Learning rate by update count: linear warm-up from 0, then cosine decay to lr * min_lr_ratio."""
    return optax.warmup_cosine_decay_schedule(0.0, hp.lr, hp.warmup, hp.steps, hp.lr * hp.min_lr_ratio)


def make_optimizer(hp: Hyper):
    """Global-norm clipping, then AdamW (decay on matrices only) under `lr_schedule`."""
    schedule = lr_schedule(hp)
    decayed = decayed_paths()

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in decayed, params)

    return optax.chain(
        optax.clip_by_global_norm(hp.clip) if hp.clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=hp.b1, b2=hp.b2, weight_decay=hp.weight_decay, mask=decay_mask),
    )


def lr_at(hp: Hyper, count: int) -> float:
    """The learning rate of update `count` (0-based), for the progress bar."""
    return float(lr_schedule(hp)(count))
