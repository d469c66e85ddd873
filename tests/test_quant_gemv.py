"""The Pallas GEMV of quantized weights (interpret mode here): equal to its jnp reference for int8 per output channel
and int4 in affine groups, 1 and 8 rows, ragged column blocks, one split and several, float32 and bfloat16; the
reference equal to `quantize.product`; the kernel lowering to Triton for Llama-2-7B's shapes; and a quantized model
decoding with it choosing the tokens it chooses without it, sequential and as an LP pair on 2 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpjax.engine import Engine
from lpjax.errors import LPJaxError
from lpjax.kernels.quant_gemv import default_blocks, quant_gemv
from lpjax.quantize import QuantizedWeight, QuantSpec, dequantize, product

SPECS = {"int8": QuantSpec.parse("int8"), "int4-g32": QuantSpec.parse("int4", 32), "int4-g128": QuantSpec.parse("int4")}


def reference(x, q):
    """The kernel's math in float32: x times the matrix `q` stands for (`quantize.dequantize`), rounded once."""
    w = dequantize(q, jnp.float32)
    return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def case(name, K, N, rows, dtype, seed=0):
    """x [rows, K] and a random quantized matrix [K, N] of scheme `name` (int4 values as jnp.int4, as on a GPU)."""
    rng = np.random.default_rng(seed)
    spec = SPECS[name]
    group = spec.group_size or K
    levels = (-127, 128) if spec.kind == "int8" else (-8, 8)
    values = jnp.asarray(rng.integers(*levels, size=(K, N)), jnp.int8 if spec.kind == "int8" else jnp.int4)
    scale = jnp.asarray(rng.uniform(0.01, 0.1, size=(K // group, N)), dtype)
    offset = jnp.asarray(rng.normal(size=(K // group, N)) * 0.1, dtype) if spec.kind == "int4" else None
    return jnp.asarray(rng.normal(size=(rows, K)), dtype), QuantizedWeight(values, scale, offset)


# (rows, dtype, blocks): K = 512 in blocks of 64 or 128 (groups of 32 several to a block, groups of 128 over two
# blocks or in one); N = 200 is a multiple of no column block; three splits of 4 blocks leave the last one short
KERNEL_CASES = {
    "1-row-float32-one-split": (1, jnp.float32, dict(block_n=64, block_k=64, splits=1)),
    "8-rows-float32-three-splits": (8, jnp.float32, dict(block_n=32, block_k=128, splits=3)),
    "8-rows-bfloat16-default-blocks": (8, jnp.bfloat16, dict()),
}


@pytest.mark.parametrize("kernel_case", KERNEL_CASES)
def test_kernel_equals_the_reference_for_int8_per_channel_and_int4_in_groups_of_32_and_128(kernel_case):
    """In bfloat16 the kernel and the reference both round the float32 sum once; `quantize.product` (XLA's) rounds
    the dequantized operand first, so it is the reference within bfloat16's rounding only. (The three schemes run in
    one program: one compile.)"""
    rows, dtype, blocks = KERNEL_CASES[kernel_case]
    cases = [case(name, 512, 200, rows, dtype, seed=i) for i, name in enumerate(SPECS)]
    results = jax.jit(lambda cases: [(quant_gemv(x, *q.parts, **blocks), reference(x, q),
                                      product(x, q)) for x, q in cases])(cases)
    for name, (got, want, xla) in zip(SPECS, results):
        assert got.shape == (rows, 200) and got.dtype == dtype, name
        got, want, xla = (np.asarray(a, np.float32) for a in (got, want, xla))
        size = np.abs(want).max()
        if dtype == jnp.float32:  # the same sums in another order
            assert np.abs(got - want).max() < 1e-6 * size, name
            assert np.abs(xla - want).max() < 1e-6 * size, name  # the reference is product's math
        else:  # one rounding of each result (bfloat16: within an ulp, 2^-7 relative), XLA's of the operand too
            assert np.all(np.abs(got - want) <= np.abs(want) * 2**-7 + 1e-6 * size), name
            assert np.abs(xla - want).max() < 2e-2 * size, name


def test_product_takes_the_kernel_for_decode_rows_only_and_names_bad_kernels():
    x, q = case("int4-g32", 64, 48, 9, jnp.float32)
    for rows in (8, 9):  # 9 rows is prefill's: XLA's product
        text = str(jax.make_jaxpr(lambda x, q: product(x, q, kernel="pallas"))(x[:rows], q))
        assert ("quant_gemv" in text) == (rows == 8)
    got, want = jax.jit(lambda x, q: (product(x, q, kernel="pallas"), product(x, q)))(x[:8], q)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="choose one of xla, pallas"):
        product(x, q, kernel="triton")
    with pytest.raises(ValueError, match="blocks 24 x 64 must be powers of 2"):
        quant_gemv(x[:8], *q.parts, block_k=24)


@pytest.mark.parametrize("scheme", ["int8", "int4-g128"])
def test_kernel_lowers_to_triton_for_llama_2_7b_shapes(scheme):
    """wqkv, wo, gate_up and down of Llama-2-7B on one GPU, as the model holds them on a GPU (int4 packed)."""
    for K, N in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]:
        G, values = (1, jnp.int8) if scheme == "int8" else (K // 128, jnp.int4)
        args = [jax.ShapeDtypeStruct((8, K), jnp.bfloat16), jax.ShapeDtypeStruct((K, N), values),
                jax.ShapeDtypeStruct((G, N), jnp.bfloat16)]
        offset = args[2] if scheme != "int8" else None
        lowered = jax.jit(lambda x, v, s, o: quant_gemv(x, v, s, o, interpret=False)).trace(
            *args, offset).lower(lowering_platforms=("cuda",))
        assert "__gpu$xla.gpu.triton" in lowered.as_text()
        block_n, block_k, splits = default_blocks(K, N, K // G, 8 if scheme == "int8" else 4)
        assert K % block_k == 0 and -(-N // block_n) * splits >= 128  # every SM of an H200 has a program
    # an LP pair's two matrices under the stack's vmap: one kernel over a grid with the pair's axis added
    pair = [jax.ShapeDtypeStruct((2, *a.shape), a.dtype) for a in args[1:]]
    paired = jax.vmap(lambda x, v, s, o: quant_gemv(x, v, s, o, interpret=False), in_axes=(None, 0, 0, 0))
    lowered = jax.jit(paired).trace(args[0], *pair, offset and pair[1]).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


@pytest.fixture(scope="module")
def mha(checkpoints):
    return str(checkpoints("mha")[0])


def test_a_quantized_lp_model_on_2_devices_decodes_the_same_greedy_tokens_with_the_kernel(mha):
    """int4 in affine groups of 32, float32: the kernel and XLA's product are the same math up to the order of the
    sums. The products run on each device's shard inside shard_map, and the LP pair's under the stack's vmap."""
    spec = QuantSpec.parse("int4", 32)
    xla = Engine.load(mha, "1:3", 2, "float32", quantize=spec)
    pallas = Engine(xla.source, xla.plan, xla.mesh, "float32", params=xla.params, quantize=spec, quant_kernel="pallas")
    prompts = [[1, 40, 41, 42, 43], [1, 50, 51]]
    assert pallas.generate(prompts, 4).tokens == xla.generate(prompts, 4).tokens


def test_the_tools_take_the_kernel_as_a_flag(mha, run_main):
    from test_cli import last_json

    from bench import run

    rc, out, err = run_main("lpjax.generate", "--model", mha, "--quantize", "int8", "--quant-kernel", "pallas",
                            "--prompt", "fox", "--max-new-tokens", 2, "--dtype", "float32", "--json")
    assert rc == 0, err
    assert last_json(out)["quant_kernel"] == "pallas" and len(last_json(out)["tokens"]) == 2
    jobs = run.plan_jobs(["tiny"], [1], {"tiny": [0]}, [1], ["lpjax", "torch-tp"], ["decode"], [], [], [], 1,
                         quantizes=(None, "int8"), quant_kernels=("xla", "pallas"))
    assert [j.name() for j in jobs] == ["lpjax", "torch-tp", "lpjax", "lpjax+pallas", "torch-tp"]
    assert jobs[3].command("o.json", 1, 1, "cpu", "default")[-2:] == ["--quant-kernel", "pallas"]


def test_an_unknown_quant_kernel_is_one_clear_error():
    with pytest.raises(LPJaxError, match="quant_kernel cuda: choose one of xla, pallas"):
        Engine.load("random:tiny", "", 1, "float32", quantize=SPECS["int8"], quant_kernel="cuda")
