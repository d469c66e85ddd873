"""Multi-device: every device count gives the single-device result; the collectives are the designed ones."""

import re

import numpy as np
import pytest

from lpjax.errors import LPJaxError
from lpjax.runtime.host_step import STEP_SPAN, HostStep

PROMPTS = [[1, 60, 61, 62, 63, 64, 65, 66, 67, 68], [1, 90, 91, 92, 93]]
STEPS = 4
CACHE_LENGTH = 32


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def greedy_tokens(engine) -> list[list[int]]:
    """8 greedy tokens for PROMPTS, in a cache of CACHE_LENGTH (the length `run_all`'s steps use)."""
    return engine.generate(PROMPTS, 8, eos=(), max_len=CACHE_LENGTH).tokens


def run_all(engine):
    """Prefill logits, cached-decode logits and greedy tokens for PROMPTS (left-padded batch)."""
    cache = engine.init_cache(len(PROMPTS), CACHE_LENGTH)
    logits, cache, n, pad = engine.prefill(cache, PROMPTS)
    prefill = np.asarray(logits)
    tokens = prefill.argmax(-1)
    decode = []
    for t in range(STEPS):
        step, cache = engine.decode_step(cache, tokens, n + t, pad)
        decode.append(step)
        tokens = step.argmax(-1)
    return prefill, np.stack(decode), greedy_tokens(engine)  # same cache length: prefill is reused


@pytest.fixture(scope="module")
def reference(engines):
    return {lp: run_all(engines("shardable", lp, 1)) for lp in ("", "2:6")}


@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("lp", ["", "2:6"])
def test_equal_to_single_device(engines, reference, devices, lp):
    engine = engines("shardable", lp, devices)
    assert engine.layout.n_devices == devices
    prefill, decode, greedy = run_all(engine)
    ref_prefill, ref_decode, ref_greedy = reference[lp]
    assert rel_err(prefill, ref_prefill) <= 1e-5
    assert rel_err(decode, ref_decode) <= 1e-5
    assert greedy == ref_greedy


def test_tied_embeddings_with_a_padded_vocabulary(engines):
    """Tied LM head on a vocabulary-split embedding, 322 tokens over 4 devices (padded to 324)."""
    engine = engines("tied_odd_vocab", "0:2", 4)
    assert engine.layout.vocab_padded == 324 and engine.params["embed"]["embedding"].shape == (324, 64)
    ref = engines("tied_odd_vocab", "0:2", 1)
    ids = np.array(PROMPTS[:1])
    got = engine.logits(ids)
    assert got.shape[-1] == 322 and rel_err(got, ref.logits(ids)) <= 1e-5
    assert engine.generate(PROMPTS, 6, eos=()).tokens == ref.generate(PROMPTS, 6, eos=()).tokens


def count_collectives(engine) -> set[tuple[str, int, int]]:
    """(path, all-reduces, all-gathers) in the optimised HLO of one decode step, on each decode path users run: the
    host-called step (logits or next token; one program, as off GPUs, and the chain of `STEP_SPAN`-stage programs
    GPUs run, counted over the chain) and the on-device loop (its body holds one step). The engine's own calls are
    `run_all`'s: on the engines it ran, those programs are compiled already."""
    cache = engine.init_cache(len(PROMPTS), CACHE_LENGTH)
    _, cache = engine.decode_step(cache, np.array([5, 6]), 12, np.array([0, 5]))
    _, cache = engine.next_token(cache, np.array([5, 6]), 12, np.array([0, 5]))
    HostStep(engine.programs, span=STEP_SPAN).next_token(cache, np.array([5, 6]), 12, np.array([0, 5]))
    greedy_tokens(engine)
    programs: dict[tuple, list[str]] = {}
    for key, compiled in engine.programs.compiled.programs.items():
        if key[0] in ("step", "next"):  # a chain: key + (its first stage,)
            programs.setdefault(key[:-1], []).append(compiled.as_text())
        elif key[0] == "decode":
            programs[key] = [compiled.as_text()]
    assert {k[0] for k in programs} == {"step", "next", "decode"}
    assert {k[3] for k in programs if k[0] == "next"} == {len(engine.programs.layout.stages), STEP_SPAN}  # spans
    return {(k[0], len(re.findall(r"\ball-reduce(?:-start)?\(", "\n".join(hlo))),
             len(re.findall(r"\ball-gather(?:-start)?\(", "\n".join(hlo)))) for k, hlo in programs.items()}


@pytest.mark.parametrize("devices", [2, 4])
def test_collectives_two_per_layer_and_two_per_pair(engines, devices):
    """Optimised HLO of one decode step, on every decode path: 2 all-reduces per stage (a sequential layer or an
    LP pair), plus 1 for the vocabulary-split embedding lookup; 1 all-gather of the vocabulary-split logits."""
    seq = engines("shardable", "", devices)
    lp = engines("shardable", "2:6", devices)
    paths = ("step", "next", "decode")
    assert count_collectives(seq) == {(path, 2 * 8 + 1, 1) for path in paths}
    assert count_collectives(lp) == {(path, 2 * (8 - 2) + 1, 1) for path in paths}


def test_each_device_holds_one_layer_of_each_pair(engines):
    engine = engines("shardable", "2:6", 4)  # mesh pair=2 x tp=2; 8 heads, 2 KV heads, head_dim 8
    wqkv = engine.params["pair_2_3"]["attn"]["wqkv"]  # [2, D, KV, G+2, hd]
    assert tuple(wqkv.sharding.spec) == ("pair", None, "tp", None, None)
    for shard in wqkv.addressable_shards:
        assert shard.data.shape == (1, 64, 1, 6, 8)  # one layer of the pair, one KV group (4 q heads + k + v)
    gate_up = engine.params["layer_0"]["mlp"]["w_gate_up"]  # [1, D, 2, F]: MLP columns over all 4 devices
    assert {s.data.shape for s in gate_up.addressable_shards} == {(1, 64, 2, 32)}
    # sequential layers split 4 ways: the 2 KV heads are repeated to 4, each device one group of 2 q heads
    assert engine.layout.stages[0].kv_repeat == 2
    assert {s.data.shape for s in engine.params["layer_0"]["attn"]["wqkv"].addressable_shards} == {(1, 64, 1, 4, 8)}
    k_cache = engine.init_cache(1, 32)["pair_2_3"].k
    assert tuple(k_cache.sharding.spec) == ("pair", None, "tp", None, None)


def test_bad_splits_are_explained(checkpoints):
    from lpjax.engine import Engine

    directory = str(checkpoints("mha")[0])  # 4 heads
    with pytest.raises(LPJaxError, match="attention heads 4 of sequential layers .* not divisible by 8"):
        Engine.load(directory, "", 8, "float32")
    with pytest.raises(LPJaxError, match="even number"):
        Engine.load(directory, "", 3, "float32")
    with pytest.raises(LPJaxError, match="only 8 CPU"):
        Engine.load(directory, "", 16, "float32")
