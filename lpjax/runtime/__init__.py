"""How a loaded model runs: compiled sharded programs, the on-device decode loop, the host-called step.

- `programs.Programs`: the weights on a mesh and every program compiled over them (forward, prefill, cache).
- `decode_loop`: decode as one on-device loop with sampling and EOS stop; the host sees only its result.
- `host_step.HostStep`: one decode step called from the host (a streaming chat's or your own loop's unit of work).
- `slots.Slots`: decode slots for continuous batching (prefill one request, insert it into a slot, decode them all
  k steps a call in one on-device loop).

`lpjax.engine.Engine` is the facade over the three.
"""
