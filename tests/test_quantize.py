"""Weight-only quantization: the schemes' error bounds, the quantized product, logits against the dequantized weights
(sequential and LP, 1 and 2 devices), GGUF files kept in their own blocks, quantized checkpoints and bad flags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_helpers import write_gguf

from lpjax.engine import Engine
from lpjax.errors import LPJaxError, LPJaxWarning
from lpjax.quantize import QuantizedWeight, QuantSpec, dequantize, product, quantize

IDS = np.array([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
INT8, INT4 = QuantSpec.parse("int8"), QuantSpec.parse("int4", 32)  # "mha": every input width a multiple of 32
CASES = [("", 1), ("1:3", 2)]  # a sequential model on one device; an LP pair between sequential layers on two


def dequantized(tree):
    """A model tree with every quantized matrix replaced by the float32 matrix it stands for."""
    return jax.tree.map(lambda x: dequantize(x, jnp.float32) if isinstance(x, QuantizedWeight) else x, tree,
                        is_leaf=lambda x: isinstance(x, QuantizedWeight))


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def mha(checkpoints):
    return str(checkpoints("mha")[0])


@pytest.fixture(scope="module")
def quantized(mha):
    """`quantized(spec, lp, devices)`: float32 engines of the "mha" checkpoint, loaded once each."""
    cache = {}

    def get(spec, lp="", devices=1):
        if (spec, lp, devices) not in cache:
            cache[spec, lp, devices] = Engine.load(mha, lp, devices, "float32", quantize=spec)
        return cache[spec, lp, devices]

    return get


# ---------------------------------------------------------------------------------------------- the schemes


@pytest.mark.parametrize("spec", [INT8, QuantSpec.parse("int8", 16), QuantSpec.parse("int4", 16)], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_every_weight_is_within_half_a_scale_of_its_dequantized_value(spec, dtype):
    w = jax.random.normal(jax.random.key(0), (64, 3, 8)) * jnp.linspace(0.01, 2, 24).reshape(3, 8)
    w = w.at[:, 0, 0].set(0.0)  # an all-zero output channel
    q = jax.jit(quantize, static_argnums=(1, 2))(w, spec, dtype)
    groups = 64 // (spec.group_size or 64)
    assert q.values.shape == w.shape and q.scale.shape == (groups, 3, 8) and q.scale.dtype == dtype
    assert q.values.dtype == {"int8": jnp.int8, "int4": jnp.int4}[spec.kind]
    assert (q.offset is not None) == (spec.kind == "int4")
    bound = np.repeat(np.asarray(q.scale, np.float32), 64 // groups, axis=0) / 2
    err = np.abs(np.asarray(dequantize(q, jnp.float32)) - np.asarray(w))
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7)
    assert (err / bound).max() > 0.9  # the bound is tight, not vacuous
    levels = np.asarray(q.values.astype(jnp.int32))
    assert levels.min() >= (-127 if spec.kind == "int8" else -8) and levels.max() <= (127 if spec.kind == "int8" else 7)


@pytest.mark.parametrize("spec", [INT8, INT4, QuantSpec.parse("int8", 32)], ids=str)
def test_the_quantized_product_is_the_product_of_the_dequantized_matrix(spec):
    w = jax.random.normal(jax.random.key(1), (64, 2, 16))
    x = jax.random.normal(jax.random.key(2), (3, 5, 64))
    q = jax.jit(quantize, static_argnums=1)(w, spec)
    got = jax.jit(product)(x, q)
    assert got.shape == (3, 5, 2, 16)
    np.testing.assert_allclose(got, jnp.einsum("btk,kno->btno", x, dequantize(q, jnp.float32)), rtol=1e-5, atol=1e-5)
    w2 = w.reshape(64, -1)
    assert np.array_equal(product(x, w2), x @ w2)  # a plain matrix: x @ w, as ever


def test_quantize_flags_parse_into_specs_and_bad_ones_say_why():
    assert QuantSpec.parse(None) is None
    assert QuantSpec.parse("int4") == QuantSpec("int4", 128) and QuantSpec.parse("int8") == QuantSpec("int8", None)
    for spec in (INT8, INT4, QuantSpec.parse("int8", 64), QuantSpec.parse("gguf")):
        assert QuantSpec.from_string(str(spec)) == spec
    assert QuantSpec.parse("int4", 64).flags() == "--quantize int4 --group-size 64"
    for kind, group, words in [(None, 64, "only with --quantize"), ("int4", 0, "must be at least 1"),
                               ("gguf", 32, "keeps the file's own blocks"), ("int3", None, "choose one of")]:
        with pytest.raises(LPJaxError, match=words):
            QuantSpec.parse(kind, group)


# ---------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("lp,devices", CASES, ids=["sequential-1-device", "lp-2-devices"])
@pytest.mark.parametrize("spec", [INT8, INT4], ids=str)
def test_logits_equal_those_of_the_dequantized_weights_in_float32(quantized, spec, lp, devices):
    engine = quantized(spec, lp, devices)
    assert engine.layout.n_devices == devices and engine.plan.spec() == lp
    reference = Engine(engine.source, engine.plan, engine.mesh, "float32", params=dequantized(engine.params))
    assert all(isinstance(engine.params[s.name]["mlp"]["w_down"], QuantizedWeight) for s in engine.layout.stages)
    assert relative(engine.logits(IDS), reference.logits(IDS)) < 1e-5  # the same math, up to the order of the sums


def test_quantized_matrices_reach_the_compiled_program_in_their_narrow_type(quantized):
    engine = quantized(INT8)
    stage = engine.params["layer_0"]
    assert all(isinstance(stage[b][m], QuantizedWeight) and stage[b][m].values.dtype == jnp.int8
               for b, m in [("attn", "wqkv"), ("attn", "wo"), ("mlp", "w_gate_up"), ("mlp", "w_down")])
    assert isinstance(engine.params["lm_head"], QuantizedWeight)
    assert engine.params["embed"]["embedding"].dtype == jnp.float32 and stage["attn"]["norm"].dtype == jnp.float32
    engine.logits(IDS)
    (program,) = [p for key, p in engine.programs.compiled.programs.items() if key[0] == "logits"]
    entry = program.as_text().split("ENTRY")[1].split("\n\n")[0]
    params = [line for line in entry.splitlines() if " parameter(" in line]
    assert sum("s8[" in line for line in params) == 17  # 4 layers x (wqkv, wo, gate/up, down), the LM head
    D, V = engine.config.dim, engine.layout.vocab_padded
    assert not any(f"f32[{D},{V}]" in line for line in params)  # no float copy of the LM head goes in


def test_int8_weights_take_about_a_quarter_of_the_float32_bytes(quantized, mha):
    plain = Engine.load(mha, "", 1, "float32").weight_bytes
    matrices = quantized(INT8).weight_bytes
    assert 0.25 * plain < matrices < 0.45 * plain  # the embedding and norms stay float32


# ---------------------------------------------------------------------------------------------- GGUF


def test_a_gguf_file_keeps_its_q8_0_q4_0_q4_1_blocks_with_the_logits_of_its_dequantized_weights(checkpoints,
                                                                                                 tmp_path):
    types = {f"blk.{i}.{m}.weight": t for i, t in enumerate(("Q8_0", "Q4_0", "Q4_1", "Q8_0"))
             for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    types |= {"blk.3.attn_v.weight": "F16", "output.weight": "Q4_1"}  # F16 has no int8/int4 form: layer 3's q/k/v
    path = write_gguf(checkpoints("mha")[0], tmp_path / "mixed.gguf", "Q8_0", types=types)
    with pytest.warns(LPJaxWarning, match=r"1 F16 \(blk.3.attn_v.weight\); they are dequantised"):
        native = Engine.load(str(path), "", 1, "float32", quantize=QuantSpec.parse("gguf"))
    layers = [native.params[f"layer_{i}"] for i in range(4)]
    assert [str(s["mlp"]["w_down"].values.dtype) for s in layers] == ["int8"] * 4  # int4 held as int8 on CPUs
    assert [s["mlp"]["w_down"].offset is not None for s in layers] == [False, False, True, False]
    assert isinstance(layers[3]["attn"]["wo"], QuantizedWeight)
    assert not isinstance(layers[3]["attn"]["wqkv"], QuantizedWeight)  # fused with the F16 matrix: dequantised
    assert layers[0]["attn"]["wqkv"].scale.shape == (1, 64 // 32, 4, 3, 16)  # blocks of 32 inputs
    reference = Engine.load(str(path), "", 1, "float32")  # today's load: every tensor dequantised to float32
    assert relative(native.logits(IDS), reference.logits(IDS)) < 1e-5


def test_gguf_weights_on_the_devices_take_about_the_bytes_of_the_file(checkpoints, tmp_path):
    path = write_gguf(checkpoints("mha")[0], tmp_path / "q8.gguf", "Q8_0")
    native = Engine.load(str(path), "", 1, "bfloat16", quantize=QuantSpec.parse("gguf"))
    # the file: every matrix in Q8_0 blocks (34 bytes a 32 weights), the embedding too; on the devices the
    # embedding is held in bfloat16 (2 bytes a weight), so a little more
    assert path.stat().st_size < native.weight_bytes < 1.25 * path.stat().st_size
    assert native.weight_bytes < 0.65 * Engine.load(str(path), "", 1, "bfloat16").weight_bytes


# ---------------------------------------------------------------------------------------------- command lines


def test_a_quantized_convert_loads_back_quantized_with_the_same_logits(mha, quantized, tmp_path, run_main):
    out = tmp_path / "int4"
    rc, stdout, err = run_main("lpjax.convert", "--model", mha, "--out", out, "--quantize", "int4", "--group-size", 32)
    assert rc == 0, err
    loaded = Engine.load(str(out), "", 1, "float32")  # no --quantize: as the checkpoint stores it
    assert loaded.quantize == INT4 and "int4 in groups of 32 inputs" in loaded.describe()
    np.testing.assert_allclose(loaded.logits(IDS), quantized(INT4).logits(IDS), rtol=1e-5, atol=1e-5)
    rc, _, err = run_main("lpjax.generate", "--model", out, "--quantize", "int8", "--prompt", "fox")
    from test_cli import assert_clean_error

    assert_clean_error(rc, err, "is already quantized as int4 in groups of 32 inputs; load it without --quantize")


def test_the_tools_print_a_warning_in_one_line(capsys):
    import warnings

    from lpjax import cli

    def main(argv):
        warnings.warn("a Q6_K matrix is dequantised", LPJaxWarning, stacklevel=2)
        return 0

    with pytest.raises(SystemExit) as e:
        cli.run(main, [])
    assert e.value.code == 0 and capsys.readouterr().err == "warning: a Q6_K matrix is dequantised\n"


@pytest.mark.parametrize("flags,words", [
    (["--quantize", "int4", "--group-size", 48], "groups of 48 inputs do not divide the hidden size"),
    (["--quantize", "int4", "--group-size", 32, "--devices", 4], "split 4 ways on 4 devices, 16 a device"),
    (["--group-size", 32], "--group-size 32: only with --quantize int4 or int8"),
    (["--quantize", "gguf"], "keeps a GGUF file's own quantized types"),
], ids=["group-not-dividing", "group-straddling-devices", "group-without-quantize", "gguf-of-another-format"])
def test_bad_quantize_flags_fail_in_one_line(mha, run_main, flags, words):
    from test_cli import assert_clean_error

    rc, _, err = run_main("lpjax.generate", "--model", mha, "--prompt", "fox", *flags)
    assert_clean_error(rc, err, words)
