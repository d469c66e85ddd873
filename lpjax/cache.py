"""The static KV cache of one stage, as a registered dataclass (a pytree: jit, shard_map and vmap see its arrays).

`k` and `v` are [stack, batch, kv_heads, max_len, head_dim]: one slice per layer of the stage (2 for an LP pair, each
layer keeps its own keys and values), head-major so attention needs no transpose of the cache (docs/design.md
section 2). The whole cache is a dict from stage name (`layer_7`, `pair_20_21`) to its `StageCache`.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class StageCache:
    k: jax.Array
    v: jax.Array


Cache = dict[str, StageCache]
