"""The benchmark harness end to end on CPU (random:tiny): every runner's records, the merge, tables and plots.
Figures from CPUs mean nothing; this proves the harness that makes the GPU figures works."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from bench import records, report, run
from lpjax.errors import LPJaxError

pytest.importorskip("torch")

METRICS = "decode,single_token"
DECODE_TOKENS = 8  # each decode figure's steps: 128 is the GPU figures' definition, 8 times the same loop


def _records(path):
    return records.read(path)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One `bench.run` of every runner, each configuration timed once (a record of one sample is a valid record; a
    second sample would time each decode loop again for nothing these tests check) over DECODE_TOKENS steps (each
    of the two PyTorch runners' four gloo processes took 5-6 s of collectives for 2 x 128 steps; the loops are the
    same for 8). torch-compile's programs go through Dynamo and AOT's whole-graph capture to aot_eager instead of
    inductor: these tests check the records, and inductor's own programs (minutes of C++ compiling on a fresh
    machine) are checked in test_torch_baselines."""
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    cmd = [sys.executable, "-m", "bench.run", "--models", "tiny", "--devices", "2", "--delta", "0,4", "--batch", "1",
           "--impls", "lpjax,torch-tp,torch-compile,hf-eager", "--torch-compile-mode", "default", "--metrics", METRICS,
           "--long-metrics", "", "--repeats", "1", "--decode-tokens", str(DECODE_TOKENS), "--device", "cpu",
           "--machine", "cpu-test", "--out", str(out)]
    from bench.torch_tp.decoder import BACKEND_VARIABLE

    env = subprocess_env(**{BACKEND_VARIABLE: "aot_eager"})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_every_configuration_has_its_records(harness):
    """Every implementation, Δ and metric is there, every figure is a positive duration, and every runner timed the
    decode steps it was asked for."""
    out, _ = harness
    got = _records(out)
    keys = {(r["impl"], r["gpus"], r["lp_delta"], r["metric"]) for r in got}
    for impl, gpus in (("lpjax", 2), ("torch-tp", 2), ("torch-compile", 2), ("hf-eager", 1)):
        for delta in (0, 4):
            for metric in METRICS.split(","):
                assert (impl, gpus, delta, metric) in keys, (impl, gpus, delta, metric)
    for r in got:
        assert r["model"] == "tiny" and r["batch"] == 1 and r["machine"] == "cpu-test" and r["date"]
        assert r["unit"] == records.METRICS[r["metric"]][0]
        assert r["value"] > 0 and len(r["samples"]) >= 1 and all(s > 0 for s in r["samples"])  # no metric is a
        # difference of two timings, so none can go negative on a loaded machine
        assert r["lp"] == ("" if r["lp_delta"] == 0 else "2:6")  # Δ=4 of 8 layers ends two before the last
        assert r.get("decode_tokens") == (DECODE_TOKENS if r["metric"] == "decode" else None)


def test_tables_and_plot(harness, tmp_path):
    out, proc = harness
    got = _records(out)
    text = report.markdown_tables(got)
    assert "### tiny: decode ms/token" in text and "lpjax vs best PyTorch" in text
    lines = text.splitlines()
    head = [c.strip() for c in lines[2].split("|")]
    row = [c.strip() for c in next(line for line in lines if line.startswith("| 2 | 4 | 1 |")).split("|")]
    for impl in ("lpjax", "torch-compile", "torch-tp"):  # 2 GPUs, Δ=4: each LP speed-up over its own Δ=0
        assert row[head.index(f"LP speed-up {impl}")].endswith("x")
    assert row[head.index("lpjax vs best PyTorch")].endswith(("x faster", "x slower**"))
    assert text.splitlines()[2] in proc.stdout  # bench.run printed the same tables
    paths = report.write_plots(got, tmp_path, "t-")
    assert [p.name for p in paths] == ["t-decode-tiny-batch1.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_replaces_only_what_is_measured_again():
    a = records.make("lpjax", "tiny", 1, 0, "", 1, "decode", [3.0, 1.0, 2.0])
    b = records.make("lpjax", "tiny", 2, 0, "", 1, "decode", [5.0])
    a2 = records.make("lpjax", "tiny", 1, 0, "", 1, "decode", [9.0])
    assert a["value"] == 2.0 and a["unit"] == "ms/token"
    assert records.merge([a, b], [a2]) == [b, a2]


def test_dry_run_plans_configurations(capsys):
    assert run.main(["--models", "llama2-7b,llama3.2-3b", "--devices", "1,2", "--delta", "0,14", "--delta-for",
                     "llama3.2-3b=0,10", "--impls", "lpjax,torch-tp,hf-eager", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "lpjax llama2-7b gpus=2 Δ=0,14 batch=1" in "\n".join(lines)
    assert any(line.startswith("torch-tp llama3.2-3b gpus=2 Δ=10 batch=1") for line in lines)
    assert not any(line.startswith("hf-eager") and "gpus=2" in line for line in lines)  # one GPU only
    gen = [line for line in lines if "generate_4096" in line]
    assert gen and all("llama2-7b" in line and not line.startswith("hf-") for line in gen)


@pytest.mark.parametrize("argv, message", [
    (["--impls", "tensorrt"], "--impls tensorrt: unknown"),
    (["--metrics", "speed"], "--metrics speed: unknown"),
    (["--models", "gpt2"], "--models gpt2: not a preset"),
    (["--delta-for", "nomodel=0,2"], "--delta-for nomodel=0,2: expected MODEL=D1,D2"),
])
def test_bad_arguments(argv, message, capsys):
    assert run.main([*argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_record_file_is_json_lines(harness):
    out, _ = harness
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_step_latency_times_the_one_program_step_and_the_engines_chain():
    """bench.step_latency runs the host-called step both ways on the same cache (CPU: no pinned-host variant), the
    engine's with its ids uploaded each call too, and the on-device loop beside them (over as few steps as the
    harness above times)."""
    from bench import step_latency
    from lpjax.engine import Engine

    got = step_latency.measure(Engine.load("random:tiny", "", 1, None), calls=2, decode_tokens=DECODE_TOKENS)
    # tiny's engine runs one program
    assert set(got) == {"one_program", "engine", "chain_4", "engine_ids_up", "loop_per_token"}
    assert all(v > 0 for v in got.values())


def test_serve_report_tables_each_load_run_against_generate_and_concurrency_1(tmp_path):
    from bench import serve_report

    (tmp_path / "gen-m-seq.json").write_text("[log line]\n" + json.dumps({"decode_tokens_per_s": 200.0}) + "\n")
    for c, tps in ((1, 180.0), (8, 900.0)):
        load = {"concurrency": c, "output_tokens_per_s": tps, "requests_per_s": c / 2, "ttft_ms_p50": 5.0,
                "ttft_ms_p99": 9.0, "itl_ms_p50": 1.0, "itl_ms_p99": 2.0, "tpot_ms_p50": 1.1, "requests_failed": 0}
        (tmp_path / f"load-m-seq-k8-c{c}.json").write_text(json.dumps(load, indent=2))  # as serve_load writes it
    assert serve_report.main([str(tmp_path)]) == 0
    rows = serve_report.load_rows(tmp_path)
    assert [(r["c"], r["vs_generate"], r["vs_c1"]) for r in rows] == [(1, 0.9, 1.0), (8, None, 5.0)]
    table = (tmp_path / "serve.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| m-seq | 8 | 1 | 180 |") and "| 0.90 | 1.00 |" in table[2]
    assert (tmp_path / "serve.png").stat().st_size > 0
    with pytest.raises(LPJaxError, match="none: no such directory"):
        serve_report.main([str(tmp_path / "none")])
