"""Hand-written kernels for steps XLA does not fuse: each beside a pure-jnp reference of the same math."""
