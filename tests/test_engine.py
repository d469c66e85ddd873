"""The static-cache engine: prefill + cached decode equal the full forward; greedy equals transformers."""

import numpy as np
import pytest
import torch

PROMPTS = ["Layer parallelism evaluates pairs", "The quick brown fox jumps over the lazy dog.", "JAX"]


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("lp", ["", "1:5"])
def test_cached_decode_equals_full_forward_with_left_padding(engines, lp):
    engine = engines("gqa_head_dim", lp)
    tok = engine.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3  # really different lengths: rows are left-padded
    rng = np.random.default_rng(0)
    continuation = rng.integers(3, engine.config.vocab_size, size=(len(prompts), 6))
    cache = engine.init_cache(len(prompts), 64)
    logits, cache, n, pad = engine.prefill(cache, prompts, pad_id=0)
    steps = [np.asarray(logits)]
    for t in range(continuation.shape[1]):
        step_logits, cache = engine.decode_step(cache, continuation[:, t], n + t, pad)
        steps.append(step_logits)
    for b, prompt in enumerate(prompts):
        full = engine.logits(np.array([prompt + list(continuation[b])]))[0]
        for t, got in enumerate(steps):
            assert rel_err(got[b], full[len(prompt) - 1 + t]) <= 1e-4, (b, t)


def test_batched_full_forward_with_left_padding_matches_unpadded(engines):
    engine = engines("mha")
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    n = max(map(len, prompts))
    tokens = np.zeros((len(prompts), n), np.int32)
    pad = np.array([n - len(p) for p in prompts])
    for b, p in enumerate(prompts):
        tokens[b, pad[b]:] = p
    batched = engine.logits(tokens, pad)
    for b, p in enumerate(prompts):
        assert rel_err(batched[b, pad[b]:], engine.logits(np.array([p]))[0]) <= 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generation_equals_transformers(checkpoints, engines, batch):
    from transformers import AutoTokenizer

    directory, model = checkpoints("gqa_head_dim")
    engine = engines("gqa_head_dim")
    tok = engine.tokenizer
    prompts = PROMPTS[:batch]
    res = engine.generate([tok.encode(p) for p in prompts], 12, eos=tok.eos_ids, pad_id=tok.pad_id)
    hf_tok = AutoTokenizer.from_pretrained(str(directory))  # the reference: transformers' own tokenizer
    hf_tok.padding_side = "left"
    hf_tok.pad_token = hf_tok.eos_token
    enc = hf_tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_id)
    for b in range(batch):
        expected = out[b, enc["input_ids"].shape[1]:].tolist()
        eos = next((i for i, t in enumerate(expected) if t in tok.eos_ids), None)
        expected = expected[: eos + 1] if eos is not None else expected
        assert res.tokens[b] == expected


def test_sampling_is_seeded_and_filters_work(engines):
    from lpjax.sampling import Sampling

    engine = engines("mha")
    prompt = [engine.tokenizer.encode(PROMPTS[0])]
    hot = Sampling(temperature=1.5)
    a = engine.generate(prompt, 16, hot, seed=1, eos=()).tokens
    assert a == engine.generate(prompt, 16, hot, seed=1, eos=()).tokens
    assert a != engine.generate(prompt, 16, hot, seed=2, eos=()).tokens
    greedy = engine.generate(prompt, 16, eos=()).tokens
    assert engine.generate(prompt, 16, Sampling(temperature=1.5, top_k=1), seed=3, eos=()).tokens == greedy
    assert engine.generate(prompt, 16, Sampling(temperature=1.0, top_p=1e-6), seed=4, eos=()).tokens == greedy


def test_eos_stops_and_streaming_chunks_agree(engines):
    engine = engines("mha")
    prompt = [engine.tokenizer.encode(PROMPTS[1])]
    full = engine.generate(prompt, 10, eos=()).tokens[0]
    stop = full[4]
    stopped = engine.generate(prompt, 10, eos=(stop,)).tokens[0]
    assert stopped == full[: full.index(stop) + 1]
    seen = []
    chunked = engine.generate(prompt, 10, eos=(), chunk=3, on_tokens=lambda rows: seen.append(len(rows[0])))
    assert chunked.tokens[0] == full and seen == [1, 4, 7, 10]


def test_sampling_rejects_bad_values():
    from lpjax.errors import LPJaxError
    from lpjax.sampling import Sampling

    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(LPJaxError):
            Sampling(**bad)



def test_host_called_step_returns_the_greedy_token_of_its_logits(engines):
    """`next_token` is `decode_step` with the argmax taken on the device: the same token ids, without the logits."""
    engine = engines("gqa_head_dim", "1:5")
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    cache = engine.init_cache(len(prompts), 64)
    logits, cache, n, pad = engine.prefill(cache, prompts)
    tokens = np.argmax(np.asarray(logits), axis=-1)
    step_logits, cache = engine.decode_step(cache, tokens, n, pad)
    again, cache = engine.next_token(cache, tokens, n, pad)  # the same slot, written again
    assert again.dtype == np.int32 and again.tolist() == np.argmax(step_logits, axis=-1).tolist()


def test_a_step_fed_back_the_token_it_returned_one_slot_on_uploads_nothing(engines, monkeypatch):
    """A streaming chat feeds back the token it was handed, one slot on: the last step left those ids on the
    device, so none go up. Any other ids (here the last step again) are uploaded. Both decode as the loop does."""
    from lpjax.runtime.host_step import HostStep

    engine = engines("gqa_head_dim", "1:5")
    step = HostStep(engine.programs, span=2)
    uploads = []
    put = engine.programs.put
    monkeypatch.setattr(engine.programs, "put", lambda x: uploads.append(np.asarray(x).tolist()) or put(x))
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    cache = engine.init_cache(len(prompts), 64)
    logits, cache, n, pad = engine.prefill(cache, prompts)
    tokens = np.argmax(np.asarray(logits), axis=-1).astype(np.int32)
    steps = [tokens]
    for t in range(5):
        before = len(uploads)
        tokens, cache = step.next_token(cache, tokens, n + t, pad)
        steps.append(tokens)
        if t:
            assert len(uploads) == before, f"step {t} uploaded {uploads[before:]}"
    again, cache = step.next_token(cache, steps[-2], n + 4, pad)
    assert uploads[-1] == [*steps[-2].tolist(), *pad.tolist(), n + 4]
    assert again.tolist() == steps[-1].tolist()
    assert np.stack(steps, axis=1).tolist() == engine.generate(prompts, 6, eos=()).tokens


@pytest.mark.parametrize("devices", [1, 2])
def test_host_called_steps_run_as_a_chain_of_stage_programs_and_decode_like_the_loop(engines, devices):
    """A host-called step is a chain of programs of a few stages each (the residual stream handed along, each
    program's cache donated); fed back its own tokens it writes what the on-device loop writes, LP pairs split over
    devices included."""
    from lpjax.runtime.host_step import HostStep

    engine = engines("gqa_head_dim", "1:5", devices)
    step = HostStep(engine.programs, span=2)  # 6 layers, "1:5" -> 4 stages -> 2 programs
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    cache = engine.init_cache(len(prompts), 64)
    logits, cache, n, pad = engine.prefill(cache, prompts)
    tokens = np.argmax(np.asarray(logits), axis=-1).astype(np.int32)
    steps = [tokens]
    for t in range(5):
        tokens, cache = step.next_token(cache, tokens, n + t, pad)
        steps.append(tokens)
    assert len([k for k in engine.programs.compiled.programs if k[0] == "next" and k[3] == 2]) == 2
    assert np.stack(steps, axis=1).tolist() == engine.generate(prompts, 6, eos=()).tokens
