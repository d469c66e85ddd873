"""Multi-step decode of the server's slots: `Slots.decode(k)` runs k steps of every slot in one program (a call
may be launched before the last is collected), and the scheduler hands each request its tokens a chunk at a time.
In process, over a tiny float32 model: the tokens do not depend on k (greedy: `generate`'s exactly; sampled: the
same for a seed), and a request that ends inside a chunk (EOS, max_tokens, the end of the cache, a cancel) gets
exactly its own tokens and frees its slot for the next."""

import dataclasses
import threading

import jax
import numpy as np
import pytest
from helpers import CORPUS

from lpjax.runtime.slots import RowSampling, Slots, row_buckets
from lpjax.serving.scheduler import Event, GenerationRequest, Scheduler

CONTEXT = 128  # the slots' cache: the length `generate` picks for these short prompts, so attention reads alike
SLOTS = 4
NEW = 24  # tokens of every `generate` reference (one decode-loop compile serves them all)
WINDOWS = [(0, 3), (10, 17), (20, 31), (40, 56)]  # prompts: token windows of one text, 4 lengths, one prefill bucket


@pytest.fixture(scope="module")
def engine(engines):
    return engines("mha")


@pytest.fixture(scope="module")
def text_ids(engine):
    return tuple(engine.tokenizer.encode(CORPUS))


@pytest.fixture(scope="module")
def prompts(text_ids):
    return [text_ids[a:b] for a, b in WINDOWS]


@pytest.fixture(scope="module")
def reference(engine):
    """`generate`'s greedy tokens for a prompt alone, EOS ignored (memoised)."""
    cache = {}

    def get(prompt):
        if prompt not in cache:
            cache[prompt] = engine.generate([list(prompt)], NEW, eos=(), pad_id=engine.tokenizer.pad_id).tokens[0]
        return cache[prompt]

    return get


@pytest.fixture(scope="module")
def slots(engine):
    """One set of `SLOTS` slots per steps_per_call k, warmed up (greedy and sampling programs compiled)."""
    made = {}

    def get(k):
        if k not in made:
            made[k] = Slots(engine.programs, SLOTS, CONTEXT, pad_id=engine.tokenizer.pad_id)
            made[k].warm_up(k)
        return made[k]

    return get


@dataclasses.dataclass
class Reply:
    """What a request received: its events in order, and the slot it decoded in."""

    events: list[Event] = dataclasses.field(default_factory=list)
    slot: int | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.tokens]

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish


def serve(slots: Slots, k: int, requests: dict[str, GenerationRequest], cancel_at: dict[str, int] | None = None
          ) -> tuple[dict[str, Reply], Scheduler]:
    """Run `requests` (submitted in order before the engine thread starts: the first `SLOTS` are admitted together,
    the rest wait for a free slot) through a scheduler of `k` steps a chunk until each ends. A request named in
    `cancel_at` is cancelled by its reader once it has had that many events (its first token is the first)."""
    sched = Scheduler(slots, max_queue=len(requests), steps_per_call=k)
    replies, tickets, cancel_at = {}, {}, cancel_at or {}

    def sink(name):
        reply = replies[name] = Reply()

        def take(event: Event):
            if reply.slot is None:
                reply.slot = tickets[name].slot  # the engine thread sets it before the first event
            reply.events.append(event)
            if len(reply.events) == cancel_at.get(name):
                sched.cancel(tickets[name])
                reply.done.set()
            if event.finish or event.error:
                reply.done.set()

        return take

    for name, request in requests.items():
        tickets[name] = sched.submit(request, sink(name))
    sched.start()
    try:
        for name, reply in replies.items():
            assert reply.done.wait(300), name  # a guard against a hang, not a timing check
    finally:
        sched.stop()
    assert not slots.busy.any() and sched.stats()["decoding"] == 0
    return replies, sched


def greedy(prompt, max_tokens, eos=()):
    return GenerationRequest(prompt, max_tokens, eos=frozenset(eos))


@pytest.mark.parametrize("k", [1, 4])
def test_concurrent_greedy_requests_get_generates_tokens_whatever_the_steps_per_call(k, slots, prompts, reference):
    """Four prompts of different lengths decode side by side; three end on max_tokens inside a chunk and the two
    waiting requests take their slots mid-way. Each gets exactly `generate`'s tokens for its prompt alone."""
    p = prompts
    plan = {"a": (p[0], NEW), "b": (p[1], 7), "c": (p[2], NEW), "d": (p[3], 14), "e": (p[1], NEW), "f": (p[3], 19)}
    replies, _ = serve(slots(k), k, {name: greedy(*r) for name, r in plan.items()})
    for name, (prompt, max_tokens) in plan.items():
        assert replies[name].tokens == reference(prompt)[:max_tokens], name
        assert replies[name].finish == "length"
    assert {replies["e"].slot, replies["f"].slot} == {replies["b"].slot, replies["d"].slot}


def test_sampled_tokens_of_a_seed_are_the_same_whatever_the_steps_per_call(slots, prompts):
    def sampled(prompt, seed):
        return GenerationRequest(prompt, NEW, RowSampling(temperature=1.0, top_p=0.9, seed=seed))

    requests = {"a": sampled(prompts[0], 7), "b": sampled(prompts[2], 8), "c": sampled(prompts[2], 9),
                "d": greedy(prompts[1], NEW)}
    one, _ = serve(slots(1), 1, requests)
    four, _ = serve(slots(4), 4, requests)
    for name in requests:
        assert four[name].tokens == one[name].tokens and len(one[name].tokens) == NEW, name
    assert one["b"].tokens != one["c"].tokens  # the same prompt, another seed: they were sampled


def test_a_request_ending_at_eos_inside_a_chunk_gets_its_tokens_and_its_slot_goes_to_the_next(slots, prompts,
                                                                                                reference):
    k = 4
    want = reference(prompts[2])
    # a token of the reference at its first appearance, not at the end of a chunk (token 0 comes from the prefill,
    # chunk c brings tokens 4c-3 .. 4c)
    at = next(i for i in range(2, NEW - 1) if i % k and want[i] not in want[:i])
    requests = {"eos": greedy(prompts[2], NEW, eos=[want[at]]), "a": greedy(prompts[0], NEW),
                "b": greedy(prompts[1], NEW), "c": greedy(prompts[3], NEW), "next": greedy(prompts[0], 12)}
    replies, _ = serve(slots(k), k, requests)
    assert replies["eos"].tokens == want[:at + 1] and replies["eos"].finish == "stop"
    assert replies["next"].slot == replies["eos"].slot
    assert replies["next"].tokens == reference(prompts[0])[:12] and replies["next"].finish == "length"
    for name, i in (("a", 0), ("b", 1), ("c", 3)):
        assert replies[name].tokens == reference(prompts[i]), name


def test_a_request_at_the_end_of_the_cache_ends_with_length_and_breaks_nothing(slots, text_ids, prompts,
                                                                               reference):
    """A request whose last chunk runs past the end of its row's cache: its tokens up to the end are those of one
    step a call, the rest of the chunk (clamped to the row's last cache slot) reaches nobody, and the request next
    to it and the one that takes its slot get `generate`'s tokens."""
    k = 4
    long = text_ids[60:73]
    room = CONTEXT - len(long)  # new tokens the scheduler allows (generate's rule: prompt + new <= context)
    chunks = -(-(room - 1) // k)  # chunks after the prefill's token
    assert len(long) + chunks * k > CONTEXT  # the last chunk's steps would write past the cache
    # "end" has the least room of the four requests that fill the slots (the others too run to the end of the
    # cache), so "next" waits for its slot
    requests = {"end": greedy(long, 1000), "a": greedy(prompts[0], 1000), "b": greedy(prompts[1], 1000),
                "c": greedy(prompts[2], 1000), "next": greedy(prompts[3], NEW)}
    one, _ = serve(slots(1), 1, {"end": requests["end"]})
    four, _ = serve(slots(k), k, requests)
    end = four["end"]
    assert end.finish == "length" and len(end.tokens) == room and end.tokens == one["end"].tokens
    assert end.tokens[:NEW] == reference(long)
    for name, i in (("a", 0), ("b", 1), ("c", 2)):
        reply = four[name]
        assert reply.finish == "length" and len(reply.tokens) == CONTEXT - len(prompts[i]), name
        assert reply.tokens[:NEW] == reference(prompts[i]), name
    assert four["next"].slot == end.slot and four["next"].tokens == reference(prompts[3])


def test_cancelling_between_chunks_frees_the_slot_for_a_waiting_request(slots, prompts, reference):
    k = 4
    requests = {"gone": greedy(prompts[2], 1000), "a": greedy(prompts[0], NEW), "b": greedy(prompts[1], NEW),
                "c": greedy(prompts[3], NEW), "next": greedy(prompts[0], 10)}
    replies, _ = serve(slots(k), k, requests, cancel_at={"gone": 2})  # after its first token and its first chunk
    gone = replies["gone"]
    assert gone.tokens == reference(prompts[2])[:1 + k] and all(e.finish is None for e in gone.events)
    assert replies["next"].slot == gone.slot and replies["next"].tokens == reference(prompts[0])[:10]


def test_a_call_decodes_the_rows_up_to_the_bucket_of_the_last_busy_slot_and_leaves_the_others(slots, prompts,
                                                                                                reference):
    assert row_buckets(1) == (1,) and row_buckets(SLOTS) == (1, 4) and row_buckets(32) == (1, 8, 32)
    k, s = 4, slots(4)
    prefix = s.prefill(prompts[1], RowSampling())
    s.insert(prefix, 0)
    assert s.rows_to_decode() == 1
    before = jax.tree.map(np.asarray, s.cache)
    tokens = [prefix.first] + [int(t) for _ in range(2) for t in s.decode(k)[:, 0]]
    after = jax.tree.map(np.asarray, s.cache)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):  # [stack, batch, ...]
        assert np.array_equal(a[:, 1:], b[:, 1:]) and not np.array_equal(a[:, :1], b[:, :1])
    assert tokens == reference(prompts[1])[:1 + 2 * k]  # one row decoded alone: generate's tokens
    s.release(0)
    s.insert(s.prefill(prompts[0], RowSampling()), 2)
    assert s.rows_to_decode() == SLOTS
    s.release(2)


def test_a_call_launched_before_the_last_is_collected_continues_from_its_tokens_on_the_device(slots, prompts,
                                                                                            reference):
    """Two calls in flight, and a sequence inserted between launches: each row's tokens are `generate`'s."""
    k, s = 4, slots(4)
    a, b = (s.prefill(p, RowSampling()) for p in prompts[:2])
    s.insert(a, 0)
    s.insert(b, 1)
    first = s.launch(k)
    second = s.launch(k)  # fed the first call's last ids without their passing through the host
    c = s.prefill(prompts[2], RowSampling())
    s.insert(c, 2)  # after two launches: its token comes from the host
    third = s.launch(k)
    ids = np.concatenate([s.collect(chunk) for chunk in (first, second, third)])
    assert [a.first, *ids[:, 0].tolist()] == reference(prompts[0])[:1 + 3 * k]
    assert [b.first, *ids[:, 1].tolist()] == reference(prompts[1])[:1 + 3 * k]
    assert [c.first, *ids[2 * k:, 2].tolist()] == reference(prompts[2])[:1 + k]
    for slot in range(3):
        s.release(slot)


def test_a_request_whose_launched_chunks_cover_its_length_gives_its_slot_to_the_next_at_once(slots, prompts,
                                                                                             reference):
    """Four requests of one chunk each fill the slots: the waiting fifth is admitted as soon as their chunk is
    launched, so no chunk runs for them past their end (steps: theirs and the fifth's only)."""
    k = 4
    requests = {name: greedy(prompts[i], 1 + k) for i, name in enumerate("abcd")} | {"e": greedy(prompts[3], NEW)}
    replies, sched = serve(slots(k), k, requests)
    for i, name in enumerate("abcd"):
        assert replies[name].tokens == reference(prompts[i])[:1 + k] and replies[name].finish == "length", name
    assert replies["e"].slot == 0 and replies["e"].tokens == reference(prompts[3])
    assert sched.steps == k * (1 + -(-(NEW - 1) // k))


def test_prompts_prefilled_back_to_back_after_the_warm_up_are_inserted_and_decoded(engine, prompts, reference):
    """JetStream's order (prefill several, then insert them): each prefill takes a one-row cache of its own, the
    warm-up's included (each bucket's warm-up inserts its own prefill, so none is handed out twice)."""
    s = Slots(engine.programs, SLOTS, CONTEXT, pad_id=engine.tokenizer.pad_id)
    s.warm_up(4)
    prefixes = [s.prefill(p, RowSampling()) for p in prompts[:2]]
    for slot, prefix in enumerate(prefixes):
        s.insert(prefix, slot)
    ids = s.decode(4)
    for slot, (p, prefix) in enumerate(zip(prompts, prefixes)):
        assert [prefix.first, *ids[:, slot].tolist()] == reference(p)[:5]


def test_steps_per_call_below_one_is_refused():
    from lpjax.errors import LPJaxError
    from lpjax.serve import parse_args

    with pytest.raises(LPJaxError, match="--steps-per-call 0: must be at least 1"):
        parse_args(["--model", "random:tiny", "--steps-per-call", "0"])
