"""The quantized PyTorch baseline on CPU (bench.torch_tp --quantize): gpt-fast's int8 and int4 schemes keep their
error bounds, the quantized products compute what their dequantized weights compute (the int4 one through torch's
int4pack CPU kernel), the quantized LP model gives the logits of an HF reference holding the dequantized weights,
each rank quantizes its own shard, bad flags fail with one line, and the harness plans and reports the quantized
configurations."""

import copy

import numpy as np
import pytest
import torch
from helpers import torch_lp_logits

from bench import records, report, run, torch_tp
from bench.common import exit_code
from bench.torch_tp import quantize as tq
from bench.torch_tp.model import build_rank_model
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan

ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = ("o_proj", "down_proj")  # split along their inputs under tensor parallelism


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


def round_trip(w: torch.Tensor, q: tq.Quantization) -> torch.Tensor:
    """w quantized and dequantized as the scheme defines it (float32)."""
    if q.mode == "int8":
        return tq.dequantize_int8(*tq.quantize_int8(w, w.dtype))
    return tq.dequantize_int4(*tq.quantize_int4(w, q.group_size, w.dtype), q.group_size)


def dense(w) -> torch.Tensor:
    """The [out, in] matrix a (quantized) weight multiplies by, read back through its own product."""
    k = w.weight.shape[1] if isinstance(w, tq.Int8Weight) else w.shape[1] if torch.is_tensor(w) else None
    if k is None:  # int4: the packed layout hides the width; the scales say it
        k = w.scales_and_zeros.shape[0] * w.group_size
    return tq.linear(torch.eye(k), w).T


# ---------------------------------------------------------------------------------------------- the schemes


def test_int8_round_trip_error_stays_within_half_a_step_of_its_row():
    w = torch.randn(48, 200) * torch.linspace(0.01, 3, 48)[:, None]
    w[5] = 0  # an all-zero row (the LM head's padded vocabulary) stays zero
    q, scales = tq.quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    err = (w - tq.dequantize_int8(q, scales)).abs()
    assert torch.all(err <= scales[:, None] / 2 + 1e-6 * w.abs())  # half a step, up to float32's rounding
    assert torch.all(tq.dequantize_int8(q, scales)[5] == 0)
    assert torch.all(scales[torch.arange(48) != 5] * 127.5 >= w.abs().amax(dim=1)[torch.arange(48) != 5] * 0.999)


@pytest.mark.parametrize("group", [32, 128])
def test_int4_round_trip_error_stays_within_half_a_step_of_its_group(group):
    w = torch.randn(16, 256) + torch.linspace(-2, 2, 256)  # groups with offsets: the zeros matter
    q, scales, zeros = tq.quantize_int4(w, group, torch.float32)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    assert scales.shape == zeros.shape == (16, 256 // group)
    err = (w - tq.dequantize_int4(q, scales, zeros, group)).abs().reshape(16, -1, group)
    assert torch.all(err <= scales[..., None] / 2 + 1e-6 * w.abs().reshape(16, -1, group))
    assert float(err.max()) > 0  # 16 levels do lose something


def test_quantized_products_compute_what_their_dequantized_weights_compute():
    """int8 as gpt-fast's WeightOnlyInt8Linear, int4 through the int4pack CPU kernel (packing of 8, 4 and 2 tiles of
    16 inputs: widths 256, 64, 96), with a bias, on a [batch, tokens, in] input."""
    g = torch.Generator().manual_seed(0)
    for mode, group, k in (("int8", 128, 200), ("int4", 32, 256), ("int4", 64, 64), ("int4", 32, 96)):
        w, b = torch.randn(48, k, generator=g), torch.randn(48, generator=g)
        x = torch.randn(2, 3, k, generator=g)
        q = tq.Quantization(mode, group)
        stored = tq.quantize_weight(w, q)
        assert isinstance(stored, tq.Int8Weight if mode == "int8" else tq.Int4Weight)
        ref = x @ round_trip(w, q).T + b
        got = tq.linear(x, stored, b)
        assert got.shape == (2, 3, 48) and got.dtype == torch.float32
        assert rel_err(got, ref.numpy()) <= 1e-5, (mode, group, k)


# ---------------------------------------------------------------------------------------------- the model


def dequantized_reference(model, q: tq.Quantization, splits: dict[int, int]):
    """A copy of the HF model whose quantized weights are their dequantized values, as a rank with layer l split
    splits[l] ways stores them: a row-parallel product is quantized per slice of its inputs."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            for name in ATTENTION + MLP:
                lin = getattr(layer.self_attn if name in ATTENTION else layer.mlp, name)
                parts = lin.weight.chunk(splits[i], dim=1) if name in ROW_PARALLEL else [lin.weight]
                lin.weight.copy_(torch.cat([round_trip(p, q) for p in parts], dim=1))
        if q.lm_head:
            ref.lm_head.weight.copy_(round_trip(ref.lm_head.weight, q))
    return ref


@pytest.mark.parametrize("mode,group,bound", [("int8", 128, 0.06), ("int4", 32, 0.5)])
def test_quantized_model_gives_the_logits_of_its_dequantized_weights(checkpoints, mode, group, bound):
    """Sequential and under an LP plan, one rank, float32: the logits of the HF reference holding the dequantized
    weights, and greedy decoding through the cache agrees with the full forward. The quantization did change the
    model, and by no more than about twice what these weights show (int8 ~3% of the largest logit, int4 ~25%)."""
    directory, model = checkpoints("shardable")
    q = tq.Quantization(mode, group)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = dequantized_reference(model, q, {i: 1 for i in range(model.config.num_hidden_layers)})
    for r in torch_tp.check(directory, ids, ("", "2:6"), new_tokens=4, quantization=q):
        pairs = LPPlan.parse(r["lp"], model.config.num_hidden_layers).pairs
        assert rel_err(r["logits"].numpy(), torch_lp_logits(reference, ids, pairs)) <= 1e-5, r["lp"]
        assert torch.equal(r["generated"], r["full_argmax"]), r["lp"]
        change = rel_err(r["logits"].numpy(), torch_lp_logits(model, ids, pairs))
        assert 1e-4 < change <= bound, (r["lp"], change)


@pytest.mark.parametrize("mode,group", [("int8", 128), ("int4", 32)])
def test_each_of_two_ranks_quantizes_its_own_shard(checkpoints, mode, group):
    """Two ranks under LP 2:6 (built in this process; no collective runs): a sequential layer is split two ways, so
    each rank's o and down products are quantized over its own half of the inputs (int8: a scale per row of the
    half; int4: groups inside the half); a paired layer is whole on its rank. Under int8 the LM head's rows are
    quantized too, under int4 they stay in float32."""
    directory, model = checkpoints("shardable")
    config, state = torch_tp.load_hf(directory)
    q = tq.Quantization(mode, group)
    plan = LPPlan.parse("2:6", config.n_layers)
    splits = {i: 1 if stage.is_pair else 2 for stage in plan.stages for i in stage.layers}
    reference = dequantized_reference(model, q, splits)
    for rank in (0, 1):
        m = build_rank_model(config, plan, rank, 2, "cpu", torch.float32, state, quantization=q)
        for stage in m.stages:
            for lay in stage.layers:
                split, index = (1, 0) if splits[lay.layer] == 1 else (2, rank)
                hf = reference.model.layers[lay.layer]
                width, ffn = config.n_heads * config.head_dim // split, config.ffn_dim // split
                wo = hf.self_attn.o_proj.weight[:, index * width:(index + 1) * width]
                w_down = hf.mlp.down_proj.weight[:, index * ffn:(index + 1) * ffn]
                assert torch.allclose(dense(lay.wo), wo, atol=1e-6), (rank, lay.layer)
                assert torch.allclose(dense(lay.w_down), w_down, atol=1e-6), (rank, lay.layer)
        assert isinstance(m.lm_head, tq.Int8Weight if mode == "int8" else torch.Tensor)
        head = dense(m.lm_head)
        lo = rank * head.shape[0]
        hi = min(lo + head.shape[0], config.vocab_size)
        assert torch.allclose(head[: hi - lo], reference.lm_head.weight[lo:hi], atol=1e-6)


# ---------------------------------------------------------------------------------------------- flags and records


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int4"], "--quantize int4 --group-size 128: a whole layer's w_down is [128, 352] (outputs, "
                             "inputs): the group of 128 does not divide its 352 inputs"),
    (["--quantize", "int4", "--group-size", "32", "--devices", "2"], "a layer split 2 ways, each share's w_down is "
                                                                     "[128, 176]"),
    (["--quantize", "int4", "--group-size", "48"], "--group-size 48: torch's int4 kernel takes groups of 32, 64, "
                                                   "128, 256"),
    (["--quantize", "int8", "--group-size", "64"], "--group-size 64: only --quantize int4 has groups"),
])
def test_bad_quantize_flags_fail_with_one_line(argv, message, capsys):
    assert exit_code(torch_tp.main, ["--device", "cpu", "--model", "tiny", "--metrics", "decode", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_int4_refuses_a_width_its_packing_cannot_take():
    with pytest.raises(LPJaxError, match=r"wo \[24, 64\]: its 24 outputs are not a multiple of 16"):
        tq.quantize_weight(torch.randn(24, 64), tq.Quantization("int4", 32), "wo")


def test_quantized_runner_records_say_their_quantization(tmp_path):
    out = tmp_path / "records.jsonl"
    for argv in (["--quantize", "int8"], ["--quantize", "int4", "--group-size", "32"]):
        assert torch_tp.main(["--device", "cpu", "--model", "tiny", "--delta", "2", "--metrics", "single_token",
                              "--repeats", "1", "--json-out", str(out), *argv]) == 0
    int8, int4 = records.read(out)
    assert (int8["quantize"], int8["group_size"], int4["quantize"], int4["group_size"]) == ("int8", None, "int4", 32)
    assert int8["lp"] == int4["lp"] == "4:6" and int8["value"] > 0 and int4["value"] > 0


def test_dry_run_lists_the_quantized_configurations(capsys):
    assert run.main(["--models", "llama2-7b", "--devices", "1,2", "--delta", "0,14", "--impls",
                     "lpjax,torch-compile,torch-tp,hf-eager", "--quantize", "none,int8,int4", "--group-size", "64",
                     "--metrics", "decode,single_token", "--long-metrics", "", "--dry-run"]) == 0
    got = capsys.readouterr()
    lines = got.out.splitlines()
    for impl in ("torch-compile", "torch-tp"):
        for label in ("", " int8", " int4 g64"):
            for gpus in (1, 2):
                for delta in (0, 14):
                    assert f"{impl}{label} llama2-7b gpus={gpus} Δ={delta} batch=1 [decode,single_token]" in lines
    assert "lpjax int8 llama2-7b gpus=2 Δ=0,14 batch=1 [decode,single_token]" in lines
    assert sum(line.startswith("hf-eager ") for line in lines) == 2  # unquantized, Δ 0 and 14
    assert "skipping hf-eager int8: the transformers baselines run unquantized weights only" in got.err


def test_harness_passes_the_flags_to_the_runners_that_quantize(tmp_path):
    jobs = run.plan_jobs(["tiny"], [2], {"tiny": [0]}, [1], ["lpjax", "torch-compile", "hf-eager"], ["decode"], [],
                         [], [], 1, [None, "int4"], 64)
    commands = {(j.impl, j.quantize): j.command(tmp_path / "r", 1, 1, "cpu", "default") for j in jobs}
    assert set(commands) == {("lpjax", None), ("torch-compile", None), ("hf-eager", None), ("lpjax", "int4"),
                             ("torch-compile", "int4")}
    for impl in ("lpjax", "torch-compile"):
        assert "--quantize int4 --group-size 64" in " ".join(commands[impl, "int4"])
        assert "--quantize" not in commands[impl, None]
    assert run.main(["--quantize", "int2", "--dry-run"]) == 2


def test_report_compares_lpjax_with_the_baselines_of_the_same_quantization():
    def rec(impl, value, quantize=None, delta=0):
        extra = {"quantize": quantize, "group_size": 128 if quantize == "int4" else None}
        return records.make(impl, "m", 1, delta, "", 1, "decode", [value], **extra)

    recs = [rec("lpjax", 4.0), rec("torch-compile", 5.0), rec("lpjax", 3.0, "int8"), rec("torch-compile", 2.0, "int8"),
            rec("torch-compile", 1.8, "int8", 14), rec("lpjax", 1.0, "int4")]
    assert len(records.merge(recs[:2], recs[2:])) == len(recs)  # a quantized record replaces no unquantized one
    lines = report.decode_table(recs, "m").splitlines()
    head = [c.strip() for c in lines[0].split("|")][1:-1]
    rows = [[c.strip() for c in line.split("|")][1:-1] for line in lines[2:]]
    assert head[:6] == ["GPUs", "Δ", "batch", "quantize", "lpjax", "torch-compile"]
    assert [r[:6] for r in rows] == [["1", "0", "1", "none", "4.00", "5.00"], ["1", "0", "1", "int8", "3.00", "2.00"],
                                     ["1", "14", "1", "int8", "", "1.80"], ["1", "0", "1", "int4", "1.00", ""]]
    verdict = head.index("lpjax vs best PyTorch")
    assert [r[verdict] for r in rows] == ["1.25x faster", "**1.50x slower**", "", ""]
    assert rows[2][head.index("LP speed-up torch-compile")] == "1.11x"  # over int8's own Δ=0
    full = report.full_table(recs, "m")
    assert "| torch-compile int8 | 1 | 14 | 1 |" in full and "| lpjax int4 | 1 | 0 | 1 |" in full
