"""LP plans and model configs validate themselves and explain what is wrong."""

import pytest

from lpjax.config import from_hf, preset
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan

BASE = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            vocab_size=100)


def test_range_pairs_consecutive_layers():
    plan = LPPlan.parse("16:30", 32)
    assert plan.pairs[0] == (16, 17) and plan.pairs[-1] == (28, 29) and plan.delta == 14 and plan.depth == 25
    assert plan.spec() == "16:30"
    assert [s.layers for s in plan.stages][15:18] == [(15,), (16, 17), (18, 19)]


def test_list_of_ranges_and_empty_plans():
    plan = LPPlan.parse("4:6,10:16", 32)
    assert plan.pairs == ((4, 5), (10, 11), (12, 13), (14, 15)) and plan.spec() == "4:6,10:16"
    for empty in ("", "none", "0", "5:5"):
        assert LPPlan.parse(empty, 32).pairs == ()
    assert LPPlan.ending_before_last(14, 32).spec() == "16:30"


@pytest.mark.parametrize("spec,words", [
    ("3:6", "odd number"), ("30:34", "0 <= START <= END <= 32"), ("16-30", "expected START:END"),
    ("4:8,6:10", "overlaps"), ("a:b", "expected START:END"), ("8:4", "0 <= START"),
])
def test_bad_plans_are_explained(spec, words):
    with pytest.raises(LPJaxError, match=words):
        LPPlan.parse(spec, 32)


def test_hf_config_keys_old_and_new_rope_spellings():
    old = from_hf(dict(BASE, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
    new = from_hf(dict(BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16}))
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling.kind == "linear" and new.rope_scaling.kind == "llama3"
    assert from_hf(dict(BASE, head_dim=32)).head_dim == 32 and from_hf(BASE).head_dim == 16


@pytest.mark.parametrize("change,words", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "not supported"),
    (dict(num_key_value_heads=3), "not a multiple"),
    (dict(hidden_size="big"), "malformed"),
])
def test_unsupported_configs_are_explained(change, words):
    with pytest.raises(LPJaxError, match=words):
        from_hf(dict(BASE, **change))
    with pytest.raises(LPJaxError, match="missing key"):
        from_hf({k: v for k, v in BASE.items() if k != "vocab_size"})


def test_presets_have_real_shapes():
    assert round(preset("llama2-7b").n_params / 1e9, 2) == 6.74
    assert round(preset("llama3.2-3b").n_params / 1e9, 2) == 3.21
    with pytest.raises(LPJaxError, match="unknown preset"):
        preset("gpt5")
