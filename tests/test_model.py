"""Logits parity with transformers, and LP against an independent PyTorch reference of docs/design.md section 1."""

import numpy as np
import pytest
import torch
from helpers import torch_lp_logits

TEXT = "The quick brown fox jumps over the lazy dog. Layer parallelism evaluates pairs of layers on one input."


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name,shard", [("mha", "20KB"), ("gqa_head_dim", None), ("llama3_rope", None),
                                        ("tied", None), ("bias", None)])
def test_logits_match_transformers(checkpoints, engines, name, shard):
    """Through the HF-directory loader; `mha` is saved as sharded safetensors with an index."""
    kwargs = {"max_shard_size": shard} if shard else {}
    directory, model = checkpoints(name, **kwargs)
    if shard:
        assert (directory / "model.safetensors.index.json").is_file()
        from lpjax.engine import Engine

        engine = Engine.load(str(directory), "", 1, "float32")
    else:
        engine = engines(name)
    ids = np.array([engine.tokenizer.encode(TEXT)])
    assert ids.shape[1] > 32  # longer than llama3_rope's original context (16): the scaling matters
    assert rel_err(engine.logits(ids), hf_logits(model, ids)) <= 1e-4


@pytest.mark.parametrize("name,lp,pairs", [("mha", "0:2", [(0, 1)]), ("gqa_head_dim", "1:5", [(1, 2), (3, 4)]),
                                           ("bias", "0:2,2:4", [(0, 1), (2, 3)])])
def test_lp_pairs_match_torch_reference(checkpoints, engines, name, lp, pairs):
    _, model = checkpoints(name)
    engine = engines(name, lp)
    ids = np.array([engine.tokenizer.encode(TEXT)])
    ref = torch_lp_logits(model, ids, pairs)
    assert rel_err(engine.logits(ids), ref) <= 1e-4
    # LP really changes the function (so the comparison above is not vacuous)
    assert rel_err(hf_logits(model, ids), ref) > 1e-2


def plain_forward(engine, ids):
    """A plain sequential Llama from the same blocks, without stages, stacking, vmap or shard_map (one jit, as the
    engine's forward is, so both see the same compiler)."""
    import jax
    import jax.numpy as jnp

    from lpjax.model import FULL, AttentionBlock, MLPBlock, Positions, rms_norm

    c = engine.config
    T = ids.shape[1]

    @jax.jit
    def forward(p, ids):
        pos = Positions(jnp.arange(T)[None], jnp.zeros((1,), jnp.int32), jnp.int32(0))
        x = p["embed"]["embedding"][ids]
        for i in range(c.n_layers):
            sp = p[f"layer_{i}"]
            first = lambda tree: {k: v[0] for k, v in tree.items()}  # noqa: E731
            attn = AttentionBlock(c, c.n_heads, c.n_kv_heads).apply({"params": first(sp["attn"])}, x, None, pos,
                                                                   FULL)[0]
            h = x + attn
            x = h + MLPBlock(c, c.ffn_dim).apply({"params": first(sp["mlp"])}, h)
        x = rms_norm(x, p["norm"]["scale"], c.norm_eps)
        head = p["embed"]["embedding"].T if c.tied_embeddings else p["lm_head"]
        return (x @ head).astype(jnp.float32)[..., : c.vocab_size]

    return np.asarray(forward(engine.params, jnp.asarray(ids)))


def test_empty_plan_is_the_plain_model(checkpoints, engines):
    _, model = checkpoints("gqa_head_dim")
    plain, empty_range = engines("gqa_head_dim", ""), engines("gqa_head_dim", "3:3")
    assert empty_range.plan.pairs == () and len(empty_range.layout.stages) == model.config.num_hidden_layers
    ids = np.array([plain.tokenizer.encode(TEXT)])
    logits = plain.logits(ids)
    assert np.array_equal(logits, empty_range.logits(ids))
    assert np.array_equal(logits, plain_forward(plain, ids))  # bit for bit: the stage machinery adds nothing
    assert rel_err(logits, torch_lp_logits(model, ids, [])) <= 1e-4


def test_flax_init_shapes_match_loader_layout(engines):
    """The module tree (flax init) and the weight loader's assembled tree agree, leaf for leaf."""
    import jax
    import jax.numpy as jnp

    from lpjax.model import LlamaLM, Positions
    from lpjax.weights import abstract_params

    engine = engines("bias", "0:2")
    model = LlamaLM(engine.layout, per_device=False, param_dtype=jnp.float32)
    tokens = jnp.zeros((1, 4), jnp.int32)
    pos = Positions(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.int32(0))
    init = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, pos)["params"])
    loaded = abstract_params(engine.layout, jnp.float32)
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)  # noqa: E731
    assert shapes(init) == shapes(loaded)


@pytest.mark.parametrize("bias_and_head", [True, False])
def test_model_params_are_the_schema_tree_params(bias_and_head):
    """Every model parameter is a schema `TreeParam` row, every row this config has is used, and each is
    initialised as its row says (its shape comes from the row: `model._param`)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from lpjax.config import PRESETS
    from lpjax.model import LlamaLM, Positions
    from lpjax.plan import LPPlan
    from lpjax.schema import BY_PATH
    from lpjax.sharding import Layout, make_mesh

    flags = dict(attention_bias=True, mlp_bias=True, tied_embeddings=False) if bias_and_head else {}
    config = dataclasses.replace(PRESETS["tiny"], n_layers=4, **flags)
    layout = Layout.build(config, LPPlan.parse("1:3", config.n_layers), make_mesh(1))
    tokens = jnp.zeros((1, 4), jnp.int32)
    pos = Positions(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.int32(0))
    params = jax.jit(LlamaLM(layout).init)(jax.random.key(0), tokens, pos)["params"]  # one compile, not one per op
    stages = {s.name for s in layout.stages}
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key for k in path]
        leaves["/".join(keys[1:] if keys[0] in stages else keys)] = np.asarray(leaf)
    assert set(leaves) == {p for p, row in BY_PATH.items() if row.present(config)}
    for path, leaf in leaves.items():
        init = BY_PATH[path].init(config)
        if not init.std:
            assert np.all(leaf == init.fill), path
        else:  # thousands of draws: the sample deviation is within a few percent of the schema's
            assert abs(leaf.std() / init.std - 1) < 0.1, path
