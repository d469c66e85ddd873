"""Continuous batching: one engine thread owns the decode slots and runs them; requests come and go between chunks.

Each iteration the thread frees the slots of finished and cancelled requests, prefills waiting requests into free
slots, launches one *chunk*: `steps_per_call` decode steps of every busy slot in one on-device program
(`Slots.launch`), and then, while it runs, hands each request its new tokens of the chunk launched before, in order.
So the device runs one chunk while the host hands out the last one, and never waits for the host. A request ends at
one of its EOS tokens (finish "stop"), after `max_tokens` tokens or at the end of the cache (finish "length"), or
when its reader cancels it (a stop string, a client gone); the rest of its chunk is discarded, and so is what the
chunk launched after it ran for it. A request whose launched chunks already cover its length gives up its slot at
once. So a new request waits at most two chunks to be admitted, a cancelled one holds its slot until then, and tokens
arrive `steps_per_call` at a time: 1 gives the lowest inter-token latency, more pay the host's per-call cost once per
chunk (throughput). At most `batch` requests decode
and `max_queue` wait; one more is refused (`QueueFull`), never queued without bound.

The thread talks to readers only through each request's `sink`, a callable it hands `Event`s to; the HTTP layer
makes that a thread-safe put into an asyncio queue.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import traceback
from collections.abc import Callable

from lpjax.runtime.slots import Chunk, RowSampling, Slots


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What to generate: `prompt` token ids, at most `max_tokens` new tokens, ending early at any of `eos`."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: RowSampling = RowSampling()
    eos: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class Event:
    """New `tokens` of a request; with `finish` ("stop" / "length") its last; with `error` it failed."""

    tokens: tuple[int, ...] = ()
    finish: str | None = None
    error: str | None = None


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


@dataclasses.dataclass(eq=False)
class Ticket:
    """A submitted request, as the scheduler tracks it."""

    id: int
    request: GenerationRequest
    sink: Callable[[Event], None]
    generated: int = 0  # tokens handed to the sink
    launched: int = 0  # tokens the launched chunks will have made for it (its first, from the prefill, included)
    slot: int | None = None  # the slot it decodes in, until its launched chunks cover its length
    ended: bool = False

    def limit(self, max_len: int) -> int:
        """Tokens it may get: `max_tokens`, and the cache holds prompt + new tokens - 1 (generate's rule)."""
        return min(self.request.max_tokens, max_len - len(self.request.prompt))


class Scheduler:
    """Continuous batching over `slots`, `steps_per_call` decode steps a chunk (see the module docstring).
    `start()` starts the engine thread, `submit` / `cancel` are called from any thread, `stop()` ends every request
    and the thread."""

    def __init__(self, slots: Slots, max_queue: int, steps_per_call: int = 1):
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call {steps_per_call}: at least 1")
        self.slots, self.max_queue, self.steps_per_call = slots, max_queue, steps_per_call
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._cancelled: set[Ticket] = set()
        self._accepted = 0  # submitted and not yet ended: decoding + waiting
        self._stopping = False
        self._stop_reason = "the server is shutting down"
        self._ids = itertools.count()
        self._active: dict[int, Ticket] = {}  # slot -> ticket; the engine thread's own
        self._pending: tuple[Chunk, dict[int, Ticket]] | None = None  # the chunk in flight and whose rows it ran
        self.failure: str | None = None  # why the engine thread stopped, if it failed
        self.steps = 0  # decode steps run (steps_per_call a chunk)
        self._thread = threading.Thread(target=self._run, name="lpjax-engine", daemon=True)

    # ---------------------------------------------------------------- any thread

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Ticket:
        """Queue `request`; its tokens go to `sink`. Raises QueueFull when `batch + max_queue` are already in."""
        with self._cond:
            if self._stopping or self.failure:
                raise RuntimeError(self.failure or "the server is shutting down")
            if self._accepted >= self.slots.batch + self.max_queue:
                raise QueueFull(f"all {self.slots.batch} decode slots are busy and {self.max_queue} requests are "
                                "already waiting; retry later")
            ticket = Ticket(next(self._ids), request, sink)
            self._accepted += 1
            self._waiting.append(ticket)
            self._cond.notify()
            return ticket

    def cancel(self, ticket: Ticket) -> None:
        """End `ticket` now (its reader is done with it): a waiting one leaves the queue, a decoding one frees its
        slot before the next chunk. Cancelling an ended request does nothing."""
        with self._cond:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._accepted -= 1
                ticket.ended = True
            elif not ticket.ended:  # decoding, or being prefilled: the engine thread ends it before its next chunk
                self._cancelled.add(ticket)
                self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            waiting = len(self._waiting)
            return {"decoding": self._accepted - waiting, "waiting": waiting, "slots": self.slots.batch,
                    "max_queue": self.max_queue, "steps_per_call": self.steps_per_call, "steps": self.steps}

    def stop(self, reason: str = "the server is shutting down") -> None:
        """End every request with an error event `reason` and stop the engine thread."""
        with self._cond:
            if not self._stopping:
                self._stopping, self._stop_reason = True, reason
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    # ---------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        try:
            while self._iteration():
                pass
            self._end_all(self._stop_reason)
        except Exception as e:  # a bug or a device failure: every request hears of it, the server reports it
            traceback.print_exc()
            self.failure = f"the engine failed: {type(e).__name__}: {e}"
            self._end_all(self.failure)

    def _iteration(self) -> bool:
        """Free, admit, run one chunk. False when stopping."""
        with self._cond:
            while not (self._stopping or self._waiting or self._cancelled or self._active or self._pending):
                self._cond.wait()
            if self._stopping:
                return False
            cancelled, self._cancelled = self._cancelled, set()
        for ticket in cancelled:
            if not ticket.ended:
                self._end(ticket, None)
        free = self.slots.free_slots()
        with self._cond:
            admitted = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
        for ticket, slot in zip(admitted, free):
            self._admit(ticket, slot)
        launched = self._launch() if self._active else None
        if self._pending is not None:
            chunk, owners = self._pending
            ids = self.slots.collect(chunk)
            for slot, ticket in owners.items():
                if not ticket.ended:
                    self._deliver(ticket, ids[:, slot].tolist())
        self._pending = launched
        return True

    def _launch(self) -> tuple[Chunk, dict[int, Ticket]]:
        """Launch a chunk of the busy slots; a request whose launched chunks now cover its length gives its slot
        back (the chunk's ids still come to it)."""
        k = self.steps_per_call
        chunk = self.slots.launch(k)
        self.steps += k
        owners = dict(self._active)
        for ticket in owners.values():
            ticket.launched += k
            self._free_if_covered(ticket)
        return chunk, owners

    def _admit(self, ticket: Ticket, slot: int) -> None:
        r = ticket.request
        prefix = self.slots.prefill(list(r.prompt), r.sampling)
        self.slots.insert(prefix, slot)
        ticket.slot, ticket.launched = slot, 1
        self._active[slot] = ticket
        self._deliver(ticket, [prefix.first])
        self._free_if_covered(ticket)

    def _deliver(self, ticket: Ticket, tokens: list[int]) -> None:
        """Hand `tokens` to their request in order, up to its last (the rest are discarded), and end the request if
        it came."""
        limit = ticket.limit(self.slots.max_len)
        tokens = tokens[:limit - ticket.generated]
        eos = next((i for i, t in enumerate(tokens) if t in ticket.request.eos), None)
        if eos is not None:
            tokens, finish = tokens[:eos + 1], "stop"
        elif ticket.generated + len(tokens) >= limit:
            finish = "length"
        else:
            finish = None
        ticket.generated += len(tokens)
        if not self._send(ticket, Event(tuple(tokens), finish)) and finish is None:
            finish = "gone"
        if finish is not None:
            self._end(ticket, None)

    def _send(self, ticket: Ticket, event: Event) -> bool:
        """Hand `event` to the request's sink; False when the reader is gone (its event loop closed)."""
        try:
            ticket.sink(event)
            return True
        except RuntimeError:
            return False

    def _end(self, ticket: Ticket, error: str | None) -> None:
        """Free the request's slot (the tokens were sent; `error`, when given, is sent as its last event)."""
        if error is not None:
            self._send(ticket, Event(error=error))
        self._free(ticket)
        with self._cond:
            ticket.ended = True
            self._accepted -= 1
            self._cancelled.discard(ticket)

    def _free_if_covered(self, ticket: Ticket) -> None:
        """Give the slot back once what is launched for the request covers its length (its ids still come to it)."""
        if ticket.launched >= ticket.limit(self.slots.max_len):
            self._free(ticket)

    def _free(self, ticket: Ticket) -> None:
        """Give the request's slot back, if it still holds one."""
        if ticket.slot is not None:
            self.slots.release(ticket.slot)
            del self._active[ticket.slot]
            ticket.slot = None

    def _end_all(self, reason: str) -> None:
        pending = self._pending[1].values() if self._pending else ()
        self._pending = None
        for ticket in {t.id: t for t in (*self._active.values(), *pending) if not t.ended}.values():
            self._end(ticket, reason)
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._accepted -= len(waiting)
        for ticket in waiting:
            ticket.ended = True
            self._send(ticket, Event(error=reason))
