"""The plan as data (lpjax/quality/plan_data.py): one compiled forward takes the LP plan as an input and computes
what the engine of that plan computes, so the plan search compiles its scoring program once, not once per plan."""

import json

import jax
import numpy as np
import pytest

from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan
from lpjax.quality.perplexity import encode_texts
from lpjax.quality.plan_data import FIRST, SECOND, SEQUENTIAL, PlanForward, layer_kinds
from lpjax.quality.search import PlanDataPerplexity, SearchSpace, engine_per_plan, plan_perplexity, scoring, search

# 6 layers: sequential; one pair; two pairs at odd offsets; two at even ones, from layer 0; one pair ending at the
# last layer; one pair at each offset parity with a layer between them
PLANS = ("", "2:4", "1:5", "0:4", "4:6", "1:3,4:6")


@pytest.fixture
def lowerings():
    """How many programs JAX lowers (traces to XLA) while the test runs: every compile, cached on disk or not."""
    count = [0]

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield count
    jax.monitoring.unregister_event_duration_listener(listen)


def test_layer_kinds_mark_each_pairs_first_and_second_layer():
    assert layer_kinds(LPPlan.parse("1:3,4:6", 6)).tolist() == [SEQUENTIAL, FIRST, SECOND, SEQUENTIAL, FIRST, SECOND]
    assert layer_kinds(LPPlan(4)).tolist() == [SEQUENTIAL] * 4


@pytest.mark.parametrize("name, plans", [("gqa_head_dim", PLANS), ("bias", ("1:3",))])
def test_logits_under_each_plan_equal_that_plans_engine(engines, name, plans):
    """GQA with its own head size; attention and MLP biases with linear RoPE scaling. One program serves every plan."""
    engine = engines(name)
    forward = PlanForward(engine)
    tokens = np.random.default_rng(0).integers(0, engine.config.vocab_size, (2, 24))
    for spec in plans:
        plan = LPPlan.parse(spec, engine.config.n_layers)
        np.testing.assert_allclose(forward.logits(plan, tokens), engines(name, spec).logits(tokens),
                                   rtol=1e-5, atol=1e-5, err_msg=f"--lp {spec!r}")
    assert forward.compiles == 1
    paired = PlanForward(engines(name, plans[-1]))  # built from an engine with pairs: the same layers, unpaired
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, paired.stacked, forward.stacked)))


def test_the_search_scores_a_plan_with_lpjax_evals_perplexity(engines, checkpoints, text_file, run_main):
    directory = checkpoints("gqa_head_dim")[0]
    rc, out, err = run_main("lpjax.eval", "--model", directory, "--lp", "1:5", "--text", text_file, "--window", 32,
                            "--stride", 16, "--batch-size", 2, "--max-tokens", 128, "--dtype", "float32", "--json")
    assert rc == 0, err
    engine = engines("gqa_head_dim")
    texts = encode_texts(engine.tokenizer, [str(text_file)], [text_file.read_text()], max_tokens=128)
    score = plan_perplexity(engine, texts, window=32, stride=16, batch_size=2)
    assert isinstance(score, PlanDataPerplexity)
    assert score(((1, 2), (3, 4))) == pytest.approx(json.loads(out.splitlines()[-1])["ppl"], rel=1e-6)


def test_the_search_compiles_its_scoring_program_once_per_batch_shape(engines, text_file, lowerings):
    """Greedy over 5 candidate pairs, Δ=4: 10 plans scored by the same two programs (3 windows in batches of 2: a
    full batch and the last one of 1), and nothing else compiled or re-stacked per plan."""
    engine = engines("gqa_head_dim")
    texts = encode_texts(engine.tokenizer, [str(text_file)], [text_file.read_text()], max_tokens=96)
    score = plan_perplexity(engine, texts, window=48, stride=24, batch_size=2)
    before = lowerings[0]  # the one-time stacking of the weights is not the search's
    res = search(SearchSpace(6, exclude_first=0, exclude_last=0), 4, score)
    assert res["evaluations"] == 10
    assert score.forward.compiles == 2 and lowerings[0] - before == 2


def test_the_search_finds_the_plan_an_engine_per_plan_finds(engines, checkpoints, text_file, run_main):
    """`python -m lpjax.plan` against the search scored by an engine per plan (each plan's own re-stack and
    compile), on the 4-layer model with every layer open to pairing: the same plan and the same perplexities."""
    directory = checkpoints("mha")[0]
    rc, out, err = run_main("lpjax.plan", "--model", directory, "--text", text_file, "--delta", 2, "--exclude-first", 0,
                            "--exclude-last", 0, "--max-tokens", 64, "--window", 64, "--dtype", "float32", "--json")
    assert rc == 0, err
    new = json.loads(out.splitlines()[-1])
    assert new["scoring"] == scoring(engines("mha")) and "the plan an input" in new["scoring"]
    engine = engines("mha")
    texts = encode_texts(engine.tokenizer, [str(text_file)], [text_file.read_text()], max_tokens=64)
    old = search(SearchSpace(4, 0, 0), 2, engine_per_plan(engine, texts, window=64, stride=32))
    assert new["best"]["lp"] == old["best"]["lp"] and new["evaluations"] == old["evaluations"] == 4
    assert new["best"]["ppl"] == pytest.approx(old["best"]["ppl"], rel=1e-6)
    assert new["sequential_ppl"] == pytest.approx(old["sequential_ppl"], rel=1e-6)
    assert [k["ppl"] for k in new["steps"][0]["kept"]] == pytest.approx([k["ppl"] for k in old["steps"][0]["kept"]],
                                                                        rel=1e-6)


def test_more_than_one_device_is_scored_by_an_engine_per_plan(engines):
    engine = engines("gqa_head_dim", devices=2)
    with pytest.raises(LPJaxError, match="runs on one device, and this engine's mesh has 2"):
        PlanForward(engine)
    assert not isinstance(plan_perplexity(engine, [[1, 2, 3]], window=3, stride=1), PlanDataPerplexity)
    assert scoring(engine).startswith("an engine per plan")
