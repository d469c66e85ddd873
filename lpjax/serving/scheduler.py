"""Continuous batching: one engine thread owns the decode slots and runs them; requests come and go between chunks.

Each iteration the thread frees the slots of finished and cancelled requests, prefills waiting requests into free
slots, then runs one *chunk*: `steps_per_call` decode steps of every busy slot in one on-device program
(`Slots.decode`), and hands each request its new tokens in order. A request ends at one of its EOS tokens (finish
"stop"), after `max_tokens` tokens or at the end of the cache (finish "length"), or when its reader cancels it (a stop
string, a client gone); the rest of its chunk is discarded. So a new request waits at most one chunk to be admitted,
a cancelled one holds its slot until the chunk ends, and tokens arrive `steps_per_call` at a time: 1 gives the lowest
inter-token latency, more pay the host's per-call cost once per chunk (throughput). At most `batch` requests decode
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

from lpjax.runtime.slots import RowSampling, Slots


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
    generated: int = 0
    slot: int | None = None
    ended: bool = False


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
            while not (self._stopping or self._waiting or self._cancelled or self._active):
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
        if self._active:
            ids = self.slots.decode(self.steps_per_call)
            self.steps += self.steps_per_call
            for slot, ticket in list(self._active.items()):
                self._deliver(ticket, ids[:, slot].tolist())
        return True

    def _admit(self, ticket: Ticket, slot: int) -> None:
        r = ticket.request
        prefix = self.slots.prefill(list(r.prompt), r.sampling)
        self.slots.insert(prefix, slot)
        ticket.slot = slot
        self._active[slot] = ticket
        self._deliver(ticket, [prefix.first])

    def _deliver(self, ticket: Ticket, tokens: list[int]) -> None:
        """Hand `tokens` to their request in order, up to its last (the rest are discarded), and end the request if
        it came."""
        r = ticket.request
        room = self.slots.max_len - len(r.prompt)  # the cache holds prompt + new tokens - 1; keep to generate's rule
        tokens = tokens[:min(r.max_tokens, room) - ticket.generated]
        eos = next((i for i, t in enumerate(tokens) if t in r.eos), None)
        if eos is not None:
            tokens, finish = tokens[:eos + 1], "stop"
        elif ticket.generated + len(tokens) >= min(r.max_tokens, room):
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
        if ticket.slot is not None:
            self.slots.release(ticket.slot)
            del self._active[ticket.slot]
            ticket.slot = None
        with self._cond:
            ticket.ended = True
            self._accepted -= 1
            self._cancelled.discard(ticket)

    def _end_all(self, reason: str) -> None:
        for ticket in list(self._active.values()):
            self._end(ticket, reason)
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._accepted -= len(waiting)
        for ticket in waiting:
            ticket.ended = True
            self._send(ticket, Event(error=reason))
