"""The Pallas decode-attention kernel (interpret mode here): RoPE, the cache write and the attention of one new token
a row in one kernel, equal to its jnp reference, the reference equal to the model's own decode path, and a model
decoding with it choosing the tokens it chooses without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpjax.cache import StageCache
from lpjax.compile import resolve_attention
from lpjax.kernels.decode_attention import decode_attention, decode_attention_reference, default_splits
from lpjax.model import Positions, _cached_attention, _write_cache, apply_rope

PROMPTS = ["Layer parallelism evaluates pairs", "The quick brown fox jumps over the lazy dog.", "JAX"]


def inputs(B, K, G, hd, L, index, pad, rows=None, dtype=jnp.float32, bias=False, seed=0):
    """Random kernel arguments: a stream of `rows` rows (B real), a full cache, RoPE frequencies for head_dim hd."""
    rng = np.random.default_rng(seed)
    rows = rows or B
    qkv = jnp.asarray(rng.normal(size=(rows, K, G + 2, hd)), dtype)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=rows), jnp.float32)
    b = jnp.asarray(rng.normal(size=(K, G + 2, hd)) * 0.1, dtype) if bias else None
    k_cache, v_cache = (jnp.asarray(rng.normal(size=(B, K, L, hd)), dtype) for _ in "kv")
    inv_freq = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    return qkv, scale, b, k_cache, v_cache, jnp.asarray(index, jnp.int32), jnp.asarray(pad, jnp.int32), inv_freq


CASES = {  # name: (B, K, G, hd, L, index, pad, keyword arguments)
    # one row, multi-head, the token at the last slot of a cache that is not a multiple of the block
    "mha_batch1_last_slot": (1, 2, 1, 64, 40, [39], [0], dict(splits=None)),
    # three rows at their own slots (one at slot 0, one at the last) with left padding, grouped heads, bias, and a
    # stream of 8 rows whose padding rows come back as zeros; one split (the kernel finishes) and three (combined)
    "gqa_batch3_one_split": (3, 2, 3, 128, 100, [5, 0, 99], [2, 0, 10], dict(splits=1, rows=8, bias=True)),
    "gqa_batch3_three_splits": (3, 2, 3, 128, 100, [5, 0, 99], [2, 0, 10], dict(splits=3, rows=8, bias=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_the_reference_and_writes_only_the_new_slot_of_the_cache(case):
    B, K, G, hd, L, index, pad, kw = CASES[case]
    rows, splits = kw.get("rows"), kw.get("splits")
    args = inputs(B, K, G, hd, L, index, pad, rows, bias=kw.get("bias", False))
    out, k_cache, v_cache = jax.jit(lambda *a: decode_attention(*a, block=16, splits=splits, out_rows=rows))(*args)
    ref_out, ref_k, ref_v = jax.jit(lambda *a: decode_attention_reference(*a, out_rows=rows))(*args)
    assert out.shape == ref_out.shape == (rows or B, K * G, hd) and out.dtype == args[0].dtype
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    # every slot but the one written is untouched; the written k and v equal the reference's to float32 rounding
    # (XLA may contract RoPE's multiply-adds differently from the kernel, depending on its compile flags)
    written = np.arange(L)[None, None, :, None] == np.asarray(index)[:, None, None, None]
    for got, ref in ((k_cache, ref_k), (v_cache, ref_v)):
        assert bool(jnp.all(jnp.where(written, True, got == ref)))
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    if rows:
        assert not np.any(np.asarray(out[B:]))


def test_kernel_in_bfloat16_is_the_reference_within_its_rounding():
    """The kernel keeps the softmax and the weighted sum in float32 to the end; the reference rounds the
    probabilities to bfloat16 first, as the model does."""
    args = inputs(3, 2, 3, 64, 100, [5, 0, 99], [2, 0, 10], 8, jnp.bfloat16)
    out, k_cache, v_cache = jax.jit(lambda *a: decode_attention(*a, block=16, splits=3, out_rows=8))(*args)
    ref_out, ref_k, ref_v = jax.jit(lambda *a: decode_attention_reference(*a, out_rows=8))(*args)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=2e-2)
    assert bool(jnp.all(k_cache == ref_k)) and bool(jnp.all(v_cache == ref_v))


def test_reference_is_the_models_decode_step():
    """The reference restates the model's math: the row factor on the product (`normed_project`), `apply_rope`,
    `_write_cache` and `_cached_attention` at one token a row."""
    B, K, G, hd, L = 3, 2, 3, 16, 24
    qkv, scale, bias, k_cache, v_cache, index, pad, inv_freq = inputs(B, K, G, hd, L, [5, 0, 23], [2, 0, 10],
                                                                       bias=True)

    def model(qkv, scale, bias, k_cache, v_cache, index, pad):
        pos = Positions.step(pad, index)
        x = (qkv * scale[:, None, None, None]).astype(qkv.dtype) + bias
        q = apply_rope(x[:, None, :, :G].reshape(B, 1, K * G, hd), pos.positions, inv_freq)
        k = apply_rope(x[:, None, :, G], pos.positions, inv_freq)
        cache = _write_cache(StageCache(k_cache, v_cache), k, x[:, None, :, G + 1], pos.index)
        return _cached_attention(q, cache.k, cache.v, pos)[:, 0], cache

    args = (qkv, scale, bias, k_cache, v_cache, index, pad)
    model_out, cache = jax.jit(model)(*args)
    out, ref_k, ref_v = jax.jit(lambda *a: decode_attention_reference(*a, inv_freq))(*args)
    assert bool(jnp.all(ref_k == cache.k)) and bool(jnp.all(ref_v == cache.v))
    np.testing.assert_allclose(out, model_out, rtol=1e-6, atol=1e-6)


def test_default_splits_fill_the_gpu_without_splitting_past_the_blocks():
    assert default_splits(1, 32, 4096) == 4  # Llama-2-7B at batch 1: 128 programs
    assert default_splits(8, 32, 4096) == 1  # enough programs already: no combine
    assert default_splits(1, 3, 256) == 4  # SmolLM2: one split a block of 64 slots


def test_pallas_attention_is_the_kernel_for_decode_steps_and_autos_choice_for_prefill():
    assert resolve_attention("pallas", "gpu", "bfloat16") == "pallas+cudnn"
    assert resolve_attention("pallas", "cpu", "float32") == "pallas+xla"
    assert resolve_attention("pallas+cudnn", "gpu", "bfloat16") == "pallas+cudnn"  # `Engine.with_plan` passes it on


@pytest.mark.parametrize("lp, devices", [("", 2), ("1:3", 1)])
def test_greedy_tokens_with_the_kernel_equal_those_without(checkpoints, engines, lp, devices):
    """Left-padded rows of different lengths, grouped KV heads. A sequential model over two devices (the kernel
    inside shard_map with each device's heads), and an LP plan on one (the pair's two layers under the stage's
    vmap: one more grid axis of the kernel, the stacked cache aliased whole)."""
    from lpjax.engine import Engine

    xla = engines("tied", lp, devices)
    pallas = Engine.load(str(checkpoints("tied")[0]), lp, devices, "float32", attention="pallas")
    assert pallas.attention == "pallas+xla"
    prompts = [xla.tokenizer.encode(p) for p in PROMPTS]
    want = xla.generate(prompts, 8, eos=()).tokens
    assert pallas.generate(prompts, 8, eos=()).tokens == want


@pytest.mark.parametrize("tool, args", [("lpjax.generate", ()), ("lpjax.eval", ("--text", "TEXT")),
                                        ("lpjax.sweep", ("--text", "TEXT")),
                                        ("lpjax.plan", ("--text", "TEXT", "--delta", "2"))])
def test_every_tool_takes_the_kernel_as_a_flag(tool, args, tmp_path, run_main, monkeypatch):
    """`--attention` on a tool's command line reaches its engine (which resolves it: the test above runs one), and an
    unknown kernel is refused before anything loads."""
    from lpjax.engine import Engine
    from lpjax.errors import LPJaxError

    text = tmp_path / "val.txt"
    text.write_text("def f(x):\n    return x\n" * 8)
    asked = []

    def load(*a, attention="auto", **kw):
        asked.append(attention)
        raise LPJaxError("stopped after the load's arguments")

    monkeypatch.setattr(Engine, "load", load)
    extra = [text if a == "TEXT" else a for a in args]
    rc, _, err = run_main(tool, "--model", "random:tiny", "--attention", "pallas", *extra)
    assert rc != 0 and "stopped after the load's arguments" in err and asked == ["pallas"]
    rc, _, err = run_main(tool, "--model", "random:tiny", "--attention", "flash", *extra)
    assert rc == 2 and "argument --attention: invalid choice: 'flash'" in err and asked == ["pallas"]
