"""The PyTorch baselines on CPU: bench.torch_tp (tensor-parallel LP over gloo ranks) gives the HF reference's
logits with and without LP and decodes greedily like its full forward; bench/hf_baselines.py's LP replacement matches
the reference through transformers' own caches; both CLIs write valid records."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import torch_lp_logits

from bench import hf_baselines, torch_tp
from lpjax.config import preset, read_hf_config
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan

ROOT = Path(__file__).resolve().parents[1]
RECORD_FIELDS = {"impl", "model", "gpus", "lp_delta", "lp", "batch", "metric", "value", "unit", "samples", "versions",
                 "device_name"}


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


def prompt(model, batch: int = 2, length: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=g)


def run_cli(*args, timeout: int = 300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """This module's in-process work on one thread: the tiny matmuls here took milliseconds each with two threads
    contending on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_records(records: list[dict], impl: str, gpus: int, metrics: list[str]) -> None:
    assert [r["metric"] for r in records] == metrics
    for r in records:
        assert RECORD_FIELDS <= r.keys()
        assert r["impl"] == impl and r["model"] == "tiny" and r["gpus"] == gpus and r["device"] == "cpu"
        assert r["unit"] == torch_tp.UNITS[r["metric"]] and r["versions"]["torch"] == torch.__version__
        assert r["samples"] and all(math.isfinite(s) for s in r["samples"])
        assert abs(r["value"] - float(np.median(r["samples"]))) <= 1e-3  # the median of the (rounded) samples


# ---------------------------------------------------------------------------------------------- torch_tp numerics


@pytest.mark.parametrize("name,world,lp", [
    ("shardable", 1, "2:6"),
    ("gqa_head_dim", 1, "1:5"),  # explicit head_dim, 4 query heads per KV head
    ("llama3_rope", 1, "0:4"),  # llama3 RoPE scaling
    ("bias", 1, "1:3"),  # attention/MLP biases, linear RoPE scaling
    ("shardable", 2, "2:6"),  # 2 gloo ranks: sequential layers split 2 ways, each pair layer whole on one rank
    ("tied_odd_vocab", 4, "1:3"),  # 4 ranks: KV heads replicated, pairs split 2 ways, tied + padded vocabulary
])
def test_torch_tp_matches_reference_and_decodes_like_the_full_forward(checkpoints, name, world, lp):
    directory, model = checkpoints(name)
    ids = prompt(model)
    results = torch_tp.check(directory, ids, ("", lp), world=world, new_tokens=6)
    logits = {}
    for r in results:
        ref = torch_lp_logits(model, ids, LPPlan.parse(r["lp"], model.config.num_hidden_layers).pairs)
        assert rel_err(r["logits"].numpy(), ref) <= 1e-4, r["lp"]
        assert r["generated"].shape == (2, 6) and torch.equal(r["generated"], r["full_argmax"]), r["lp"]
        logits[r["lp"]] = r["logits"].numpy()
    assert rel_err(logits[lp], logits[""]) > 1e-3  # the plan really changed the function


@pytest.mark.parametrize("world", [1, 2])
def test_torch_compile_baseline_matches_reference_and_decodes_like_the_full_forward(checkpoints, world):
    """The torch-compile baseline: prefill and the greedy decode step through torch.compile (inductor's CPU backend
    here, really compiled), with functional collectives over gloo ranks when world > 1. Four layers, a pair between
    sequential ones: both kinds of stage and a boundary each way between them. Two programs (the prefill that writes
    the cache, the decode step) of 28 C++ kernels in one process, where 8 layers (2:6) took 66 kernels and a
    compiled full forward of the longer sequence 12 more (each kernel about 1 CPU-s to compile on a machine without
    inductor's cache, beside inductor's own work on each program)."""
    directory, model = checkpoints("shardable_4_layers")
    ids = prompt(model)
    (r,) = torch_tp.check(directory, ids, ("1:3",), world=world, new_tokens=6, compile_mode="default")
    ref = torch_lp_logits(model, ids, LPPlan.parse("1:3", model.config.num_hidden_layers).pairs)
    assert rel_err(r["logits"].numpy(), ref) <= 1e-4
    assert r["generated"].shape == (2, 6) and torch.equal(r["generated"], r["full_argmax"])
    if world == 1:  # ran in this process: both programs went through torch.compile
        assert {(torch_tp.prefill, "default"), (torch_tp.greedy_step, "default")} <= torch_tp._PROGRAMS.keys()


def test_torch_tp_layout_slots_and_kv_replication():
    stage = LPPlan.parse("2:4", 8).stages[2]
    assert stage.layers == (2, 3)
    assert [torch_tp.layer_slots(stage, r, 4) for r in range(4)] == [[(2, 2, 0)], [(2, 2, 1)], [(3, 2, 0)],
                                                                      [(3, 2, 1)]]
    assert torch_tp.layer_slots(stage, 0, 1) == [(2, 1, 0), (3, 1, 0)]
    assert [list(torch_tp.kv_head_range(2, 8, i)) for i in range(8)] == [[0]] * 4 + [[1]] * 4
    assert list(torch_tp.kv_head_range(8, 2, 1)) == [4, 5, 6, 7]
    with pytest.raises(LPJaxError, match="attention heads 8 .* not divisible by 6"):
        torch_tp.check_layout(preset("tiny"), LPPlan(8), 6)


def test_pytorch_runners_reuse_lpjax_without_starting_jax():
    """The PyTorch runners take lpjax's layout rules, weight schema and constants, but importing them starts no JAX
    backend: on a GPU machine that would take the GPU's memory from the baseline being measured."""
    code = ("import bench.torch_tp, bench.hf_baselines\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge.backends_are_initialized()")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr


def test_load_hf_reads_a_checkpoint_by_hf_names(checkpoints):
    directory, model = checkpoints("mha")
    config, state = torch_tp.load_hf(directory)
    assert config.n_layers == model.config.num_hidden_layers and "lm_head.weight" in state
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], model.model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(LPJaxError, match="lacks"):
        state["model.layers.9.mlp.up_proj.weight"]


def test_torch_tp_bench_in_process_records(tmp_path, capsys):
    """--devices 1 runs in this process: the decode loop's records for two plans."""
    out = tmp_path / "records.jsonl"
    metrics = ["decode", "single_token", "prefill_1024", "peak_memory"]
    assert torch_tp.main(["--device", "cpu", "--model", "tiny", "--delta", "0,2", "--batch", "2",
                          "--metrics", ",".join(metrics), "--repeats", "1", "--json-out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records
    assert [(r["lp"], r["lp_delta"], r["batch"]) for r in records[::4]] == [("", 0, 2), ("4:6", 2, 2)]
    check_records(records[:4], "torch-tp-cudagraph", 1, metrics)
    check_records(records[4:], "torch-tp-cudagraph", 1, metrics)
    assert all(r["value"] > 0 for r in records)


def test_torch_tp_cli_spawns_ranks_and_appends_records(tmp_path):
    out = tmp_path / "records.jsonl"
    out.write_text('{"earlier": true}\n')
    metrics = ["single_token", "prefill_1024", "peak_memory"]
    rc, stdout, err = run_cli("bench.torch_tp", "--device", "cpu", "--model", "tiny", "--devices", 2, "--delta", 2,
                              "--metrics", ",".join(metrics), "--repeats", 1, "--json-out", out)
    assert rc == 0, err
    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": True}
    records = [json.loads(line) for line in lines[1:]]
    assert [json.loads(line) for line in stdout.splitlines()] == records
    check_records(records, "torch-tp-cudagraph", 2, metrics)
    assert all(r["lp"] == "4:6" and r["lp_delta"] == 2 and r["value"] > 0 for r in records)
    assert "[torch-tp]" in err


@pytest.mark.parametrize("argv,words", [
    (["--devices", "64"], "only"),
    (["--device", "cpu", "--devices", "3"], "even number"),
    (["--device", "cpu", "--delta", "3"], "must be even"),
    (["--device", "cpu", "--metrics", "decode,speed"], "choose from"),
    (["--device", "cpu", "--batch", "0"], "--batch"),
    (["--device", "cpu", "--model", "gpt2"], "unknown preset"),
])
def test_torch_tp_bad_input_is_one_clear_error(argv, words):
    with pytest.raises(LPJaxError, match=words):
        torch_tp.main(["--model", "tiny", *argv] if "--model" not in argv else argv)


# ---------------------------------------------------------------------------------------------- transformers


def test_hf_lp_replacement_matches_reference_through_dynamic_and_static_caches(checkpoints):
    directory, reference = checkpoints("gqa_head_dim")
    model = copy.deepcopy(reference)  # the session's model stays untouched
    config = read_hf_config(directory)[0]
    ids = prompt(model)
    plan = LPPlan.parse("1:5", config.n_layers)
    hf_baselines.apply_lp(model, plan)
    assert len(model.model.layers) == plan.depth
    with torch.no_grad():
        got = model(input_ids=ids).logits.numpy()
    assert rel_err(got, torch_lp_logits(reference, ids, plan.pairs)) <= 1e-4
    for impl in hf_baselines.IMPLS:  # greedy through generate: each paired attention writes its own cache slot
        new = hf_baselines.Runner(model, impl, "cpu", config).generate(ids, 6, 64)[:, ids.shape[1]:]
        with torch.no_grad():
            full = model(input_ids=torch.cat([ids, new[:, :-1]], dim=1)).logits[:, ids.shape[1] - 1:]
        assert torch.equal(new, full.argmax(-1)), impl
    hf_baselines.apply_lp(model, LPPlan(config.n_layers))  # an empty plan restores the plain model
    with torch.no_grad():
        plain = model(input_ids=ids).logits.numpy()
    assert rel_err(plain, torch_lp_logits(reference, ids, ())) <= 1e-5


def test_hf_decode_metric_in_process(checkpoints):
    """The decode definition runs for both implementations (one generate of 129 tokens, timed between the stamps of
    its first and last token), and the model-alone figure rides on the record."""
    directory, reference = checkpoints("mha")
    config = read_hf_config(directory)[0]
    plan = LPPlan.parse("0:2", config.n_layers)
    model = copy.deepcopy(reference)
    hf_baselines.apply_lp(model, plan)
    for impl in hf_baselines.IMPLS:
        (rec,) = hf_baselines.measure(model, impl, "tiny", config, plan, 1, ["decode"], 1, 1, "cpu", "float32", None)
        check_records([rec], impl, 1, ["decode"])
        assert rec["lp"] == "0:2" and "note" in rec and rec["versions"]["transformers"]
        assert rec["value"] > 0 and rec["forward_loop_ms_per_token"] > 0


def test_hf_cli_both_impls_append_records(tmp_path):
    out = tmp_path / "records.jsonl"
    metrics = ["single_token", "prefill_1024", "peak_memory"]
    rc, stdout, err = run_cli("bench.hf_baselines", "--impl", "hf-eager,hf-static-compile", "--device", "cpu",
                              "--model", "tiny", "--delta", 2, "--metrics", ",".join(metrics), "--repeats", 1,
                              "--json-out", out)
    assert rc == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in stdout.splitlines()] == records
    check_records(records[:3], "hf-eager", 1, metrics)
    check_records(records[3:], "hf-static-compile", 1, metrics)
    assert "compile skipped on cpu" in records[3]["note"] and all(r["lp"] == "4:6" for r in records)
    assert records[1]["value"] > 0 and records[2]["value"] > 0


def test_hf_cli_refuses_several_gpus():
    with pytest.raises(LPJaxError, match="one GPU"):
        hf_baselines.main(["--impl", "hf-eager", "--devices", "2", "--device", "cpu", "--model", "tiny"])
