"""The LP quality tools: the plan sweep (`python -m lpjax.sweep`) and the plan search (`python -m lpjax.plan`)."""

import itertools
import json
import random

import pytest
from test_cli import assert_clean_error, last_json, run

from lpjax import cli
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan
from lpjax.quality.perplexity import encode_texts, perplexity
from lpjax.quality.search import Scorer, SearchSpace, beam_search, plan_perplexity, search
from lpjax.quality.sweep import pareto_front, sweep_plans

SWEEP_ARGS = ["--window", 32, "--stride", 16, "--batch-size", 8, "--max-tokens", 128, "--dtype", "float32"]


@pytest.fixture
def quick_compiles(monkeypatch):
    """Every plan is a new XLA program, and on a CPU XLA's optimisation passes are most of a tiny program's compile
    time; they change nothing these tests check (each compares numbers computed under the same setting)."""
    import jax

    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # for subprocesses
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def all_plans(space: SearchSpace, n_pairs: int):
    """Brute force: every set of `n_pairs` disjoint candidate pairs."""
    for combo in itertools.combinations(space.candidates, n_pairs):
        layers = [layer for p in combo for layer in p]
        if len(set(layers)) == len(layers):
            yield combo


def widest_level(space: SearchSpace, n_pairs: int) -> int:
    """A beam this wide keeps every partial plan of every size: the search is then exhaustive."""
    return max(sum(1 for _ in all_plans(space, k)) for k in range(1, n_pairs))


# ------------------------------------------------------------------------------------------------ plan lists, logic


def test_sweep_plans_defaults_positions_and_errors():
    plans = sweep_plans(16, [4, 0], position=True, step=4, given="1:3,5:7")
    got = {(p.plan.spec(), p.kind) for p in plans}
    assert ("", "sequential") in got and ("10:14", "default") in got and ("1:3,5:7", "given") in got
    assert {s for s, k in got if k == "position"} == {"0:4", "4:8", "8:12", "12:16"}
    assert len(plans) == len({p.plan for p in plans}) == 7
    assert [p.plan.spec() for p in sweep_plans(8, [2])] == ["", "4:6"]  # sequential always in, for the references
    with pytest.raises(LPJaxError, match="odd number"):
        sweep_plans(8, [3])
    with pytest.raises(LPJaxError, match="0 <= START"):
        sweep_plans(8, [8])


def test_pareto_front():
    pts = [(10.0, 5.0), (11.0, 4.0), (12.0, 4.5), (10.0, 6.0), (9.5, 7.0), (11.0, 4.0)]
    assert pareto_front(pts) == [True, True, False, False, True, True]


@pytest.mark.parametrize("n_layers,exclude,delta,seed", [(6, (0, 0), 4, 0), (8, (1, 1), 4, 1), (9, (0, 1), 6, 2),
                                                         (10, (1, 0), 6, 3), (7, (1, 1), 4, 4)])
def test_wide_beam_equals_brute_force_and_greedy_stays_valid(n_layers, exclude, delta, seed):
    """Synthetic scores with pair interactions (so greedy can go wrong): a beam as wide as the widest level of
    partial plans finds the brute-force optimum; greedy always ends with delta/2 disjoint pairs in the space."""
    rng = random.Random(seed)
    space = SearchSpace(n_layers, *exclude)
    cost = {p: rng.random() for p in space.candidates}
    clash = {(p, q): rng.random() for p in space.candidates for q in space.candidates}

    def score(pairs):
        return sum(cost[p] for p in pairs) + sum(clash[p, q] for p in pairs for q in pairs if p < q)

    n = delta // 2
    optimum = min(score(p) for p in all_plans(space, n))
    wide = beam_search(space, n, Scorer(score), beam=widest_level(space, n))[-1].kept[0]
    assert wide[0] == pytest.approx(optimum)
    for beam in (1, 2):
        ppl, pairs = beam_search(space, n, Scorer(score), beam=beam)[-1].kept[0]
        plan = LPPlan(n_layers, pairs)  # validates: consecutive, disjoint, inside the model
        assert plan.delta == delta and space.allows(plan) and ppl >= optimum - 1e-12


def test_search_never_returns_worse_than_the_default_range():
    """Greedy walks into a trap (its first pair leaves only bad second pairs); the default range 0:4, scored for
    the comparison anyway, is then the answer."""
    space = SearchSpace(6, 0, 0)
    cost = {(0, 1): 1.0, (1, 2): 0.5, (2, 3): 1.0, (3, 4): 5.0, (4, 5): 5.0}
    res = search(space, 4, lambda pairs: 10 + sum(cost[p] for p in pairs), beam=1)
    assert res["steps"][-1]["kept"][0]["ppl"] == 15.5  # what greedy itself found
    assert res["best"]["lp"] == "0:4" == res["default"]["lp"] and res["best"]["ppl"] == 12.0
    assert "default range" in res["best"]["found_by"] and res["sequential_ppl"] == 10
    assert res["evaluations"] == 5 + 2 + 1 + 1  # step 1, step 2, the default range, sequential


def test_search_space_limits():
    space = SearchSpace(6)  # layers 0 and 5 never paired: candidates (1,2), (2,3), (3,4)
    assert space.candidates == ((1, 2), (2, 3), (3, 4)) and space.check(4) == 2
    assert not space.allows(LPPlan.parse("0:2", 6)) and space.allows(LPPlan.parse("1:5", 6))
    for delta, words in ((3, "even"), (0, "positive"), (6, "too large")):
        with pytest.raises(LPJaxError, match=words):
            space.check(delta)
    # greedy must not pick (2,3) first when a second pair is still needed: it would leave no room
    res = search(space, 4, lambda pairs: -10.0 if pairs == ((2, 3),) else 1.0 + len(pairs))
    assert res["best"]["lp"] == "1:5"


# ------------------------------------------------------------------------------------------------ on a real model


def test_beam_search_on_a_6_layer_model_is_exhaustive(checkpoints, text_file, quick_compiles):
    """Perplexity-scored search on the 6-layer checkpoint with layer 5 kept sequential: a beam of 4 holds every
    one-pair plan, so it must find the brute-force optimum over all 3 plans of Δ=4; greedy's plan is valid and no
    worse than the default range 0:4. The search's scores are `quality.perplexity.perplexity` of the plan's engine."""
    from lpjax.engine import Engine

    # an engine of its own, not the shared fixture's: its programs are compiled under quick_compiles
    engine = Engine.load(str(checkpoints("gqa_head_dim")[0]), "", 1, "float32")
    texts = encode_texts(engine.tokenizer, [str(text_file)], [text_file.read_text()], max_tokens=48)
    space = SearchSpace(6, exclude_first=0, exclude_last=1)
    score = Scorer(plan_perplexity(engine, texts, window=48, stride=24))  # shared, so each plan runs once
    greedy = search(space, 4, score, beam=1)
    wide = search(space, 4, score, beam=widest_level(space, 2))
    brute = {p: score(p) for p in all_plans(space, 2)}
    assert widest_level(space, 2) == 4 and len(brute) == 3
    assert score.evaluations == 4 + 3 + 1  # one-pair plans, two-pair plans, sequential
    best = min(brute, key=brute.get)
    assert wide["best"]["ppl"] == brute[best] and wide["best"]["lp"] == LPPlan(6, best).spec()
    assert wide["method"] == "beam search (beam 4)" and greedy["method"] == "greedy (beam 1)"
    plan = LPPlan.parse(greedy["best"]["lp"], 6)
    assert plan.delta == 4 and [list(p) for p in plan.pairs] == greedy["best"]["pairs"]
    assert greedy["default"]["lp"] == "0:4" and greedy["best"]["ppl"] <= greedy["default"]["ppl"]
    assert greedy["best"]["ppl"] >= brute[best] and all(len(s["kept"]) == 1 for s in greedy["steps"])
    check = perplexity(engine.with_plan(wide["best"]["lp"]), texts, 48, 24)["ppl"]
    assert check == pytest.approx(brute[best], rel=1e-6)
    assert score(()) == perplexity(engine, texts, 48, 24)["ppl"] == greedy["sequential_ppl"]


def test_sweep_end_to_end(checkpoints, text_file, tmp_path, capsys, quick_compiles):
    """The whole CLI in this process (the entry point itself is run as a subprocess at the end)."""
    from lpjax import sweep
    from lpjax.engine import Engine

    directory, _ = checkpoints("mha")
    out = tmp_path / "sweep"
    argv = ["--model", directory, "--text", text_file, "--delta", "0,2", "--position", "--devices", 1,
            "--new-tokens", 8, "--repeats", 2, "--out", out, "--json", *SWEEP_ARGS]
    assert sweep.main(list(map(str, argv))) == 0
    stdout, err = capsys.readouterr()
    res = last_json(stdout)
    records = res["records"]
    assert [r["lp"] for r in records] == ["", "0:2", "2:4"] and res["complete"] and res["devices"] == 1
    assert [r["kind"] for r in records] == ["sequential", "default", "position"]
    assert "plan 3 of 3" in err and "median of 2" in stdout
    for r in records:
        assert r["ms_per_token"] > 0 and len(r["ms_per_token_runs"]) == 2 and r["depth"] == 4 - r["delta"] // 2
        assert r["speedup"] == pytest.approx(records[0]["ms_per_token"] / r["ms_per_token"])
        assert r["delta_ppl"] == pytest.approx(r["ppl"] - records[0]["ppl"])
    assert [r["pareto"] for r in records] == pareto_front([(r["ppl"], r["ms_per_token"]) for r in records])
    assert json.loads((out / "sweep.json").read_text())["records"] == records
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "sweep.txt").read_text()
    assert all(f"\n{r['label']} " in table for r in records) and "ms/token" in table
    engine = Engine.load(str(directory), "", 1, "float32")
    texts = encode_texts(engine.tokenizer, [str(text_file)], [text_file.read_text()], max_tokens=128)
    seq = perplexity(engine, texts, 32, 16, batch_size=8)
    assert records[0]["ppl"] == pytest.approx(seq["ppl"], rel=1e-6) and records[0]["tokens"] == seq["tokens"] == 127
    rc, _, err = run("lpjax.sweep", "--model", directory, "--text", text_file, "--out", out)
    assert_clean_error(rc, err, "sweep.txt, sweep.json, sweep.png already there")


def test_timings_measured_elsewhere_replace_the_decode_times_and_redraw_the_front():
    from bench.quality_report import merge_timings
    from lpjax.sweep import finish

    cpu = finish([{"lp": "", "delta": 0, "ppl": 10.0, "ms_per_token": 9.0, "ms_per_token_runs": [9.0]},
                  {"lp": "2:4", "delta": 2, "ppl": 11.0, "ms_per_token": 9.5, "ms_per_token_runs": [9.5]}])
    assert [r["pareto"] for r in cpu] == [True, False]
    gpu = [{"lp": "2:4", "ms_per_token": 1.0, "ms_per_token_runs": [1.0, 1.1]},
           {"lp": "", "ms_per_token": 2.0, "ms_per_token_runs": [2.0]}]
    merged = merge_timings(cpu, gpu)
    assert [r["ms_per_token"] for r in merged] == [2.0, 1.0] and [r["ppl"] for r in merged] == [10.0, 11.0]
    assert [r["speedup"] for r in merged] == [1.0, 2.0] and [r["pareto"] for r in merged] == [True, True]
    with pytest.raises(ValueError, match="no timing for plan"):
        merge_timings(cpu, gpu[:1])


def test_the_quantize_table_compares_each_plan_with_its_float32_dequantised_reference():
    from bench.quality_report import quantize_table

    def record(lp, dtype, quantize, ppl):
        return {"lp": lp, "dtype": dtype, "quantize": quantize, "ppl": ppl, "accuracy": 0.5, "weight_bytes": 2e6,
                "tokens": 127}

    rows = quantize_table([record("", "float32", "int8", 10.1), record("2:4", "bfloat16", "int4:64", 12.1),
                           record("2:4", "float32", None, 11.0), record("", "float32", None, 10.0),
                           record("", "float32", "gguf", 10.0)]).splitlines()[2:]
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| sequential", "float32", "dequantised"],
        ["| sequential", "float32", "the file's own blocks (`--quantize gguf`)"],
        ["| sequential", "float32", "`--quantize int8`"], ["| 2:4", "float32", "dequantised"],
        ["| 2:4", "bfloat16", "`--quantize int4 --group-size 64`"]]
    assert [row.split(" | ")[5] for row in rows] == ["+0.00%", "+0.00%", "+1.00%", "+0.00%", "+10.00%"]


def test_next_token_accuracy_is_the_share_of_scored_tokens_the_argmax_predicts():
    import numpy as np

    from lpjax.engine import Engine
    from lpjax.generate import DEFAULT_MODEL

    engine = Engine.load(DEFAULT_MODEL, "", 1, "float32")  # trained: it predicts some tokens of Python right
    ids = engine.tokenizer.encode("def read_config(path):\n    with open(path) as f:\n        return f.read()\n")
    res = perplexity(engine, [ids], window=len(ids), stride=len(ids) - 1)  # one window: the whole text's context
    predicted = engine.logits(np.array([ids]))[0, :-1].argmax(-1)
    assert res["accuracy"] == pytest.approx(float(np.mean(predicted == np.array(ids[1:]))))
    assert 0 < res["accuracy"] < 1 and res["tokens"] == len(ids) - 1


# ------------------------------------------------------------------------------------------------ bad input


def error_of(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.run(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert e.value.code == 2 and "Traceback" not in err and lines[-1].startswith("error:")
    return lines[-1]


@pytest.mark.parametrize("tool,args,words", [
    ("sweep", ["--delta", "0,2"], "--text: give at least one"),
    ("sweep", ["--text", "{empty}"], "empty"),
    ("sweep", ["--text", "{text}", "--delta", "0,3"], "odd number"),
    ("sweep", ["--text", "{text}", "--delta", "4"], "0 <= START"),
    ("sweep", ["--text", "{text}", "--delta", "two"], "comma-separated"),
    ("search", ["--delta", "2"], "--text: give at least one"),
    ("search", ["--text", "{text}", "--delta", "3"], "even"),
    ("search", ["--text", "{text}", "--delta", "4"], "too large"),
    ("search", ["--text", "{text}"], "--delta: give"),
    ("sweep", ["--model", "/nonexistent/model", "--text", "{text}"], "no such file"),
])
def test_bad_input_gets_one_line_and_exit_2(checkpoints, text_file, tmp_path, capsys, tool, args, words):
    import importlib

    from lpjax import sweep

    search = importlib.import_module("lpjax.plan.__main__")  # the search's command line
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    model = [] if "--model" in args else ["--model", checkpoints("mha")[0]]
    argv = model + [a.format(text=text_file, empty=empty) for a in args]
    assert words in error_of({"sweep": sweep.main, "search": search.main}[tool], argv, capsys)


def test_plan_module_runs_the_search_cli(checkpoints, text_file):
    rc, _, err = run("lpjax.plan", "--model", checkpoints("mha")[0], "--text", text_file, "--delta", 3)
    assert_clean_error(rc, err, "--delta 3: must be a positive even number")
