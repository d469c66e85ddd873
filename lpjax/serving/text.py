"""Token ids to text as they arrive, with stop strings: what a streamed reply may show so far.

Decoding is incremental over a short window of tokens (as text-generation-inference does): the text of the window
is compared with the text of its start, so a token whose meaning depends on its neighbours (a SentencePiece leading
space, a UTF-8 character split over byte tokens) comes out right, without decoding the whole reply at every token.
A stop string ends the reply before it; text that might be the start of a stop string is held back until the next
tokens tell.
"""

from __future__ import annotations


class TextStream:
    """The reply text of token ids fed in order to `add`, with `stop` strings. `tokens` counts the ids consumed
    (those after a stop string are not); `stopped` says a stop string ended the text."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # decoded so far (cut before a stop string once one appears)
        self.sent = 0  # characters of `text` handed out
        self.tokens = 0
        self.stopped = False
        self._ids: list[int] = []
        self._prefix = 0  # the window: ids[_prefix:_read] are decoded into text already, as context for the next
        self._read = 0

    def add(self, ids) -> str:
        """Feed new token ids; the new text that may be shown (nothing after a stop string)."""
        for token in ids:
            if self.stopped:
                break
            self.tokens += 1
            self._ids.append(int(token))
            self._decode()
        return self._take(final=False)

    def flush(self) -> str:
        """The rest of the text (the reply ended): what was held back as a possible stop string, and the tail of
        tokens that decodes to an incomplete character (as a replacement character, as a full decode writes it)."""
        if not self.stopped and self._read < len(self._ids):
            before = self.tokenizer.decode(self._ids[self._prefix:self._read])
            now = self.tokenizer.decode(self._ids[self._prefix:])
            if len(now) > len(before):
                self._grow(now[len(before):])
        return self._take(final=True)

    def _decode(self) -> None:
        decode = self.tokenizer.decode
        before = decode(self._ids[self._prefix:self._read])
        now = decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._grow(now[len(before):])
            self._prefix, self._read = self._read, len(self._ids)

    def _grow(self, piece: str) -> None:
        start = max(self.sent, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._held(self.text[self.sent:])
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _held(self, pending: str) -> int:
        """Characters at the end of `pending` that begin some stop string (shown once the next tokens tell)."""
        for k in range(min(len(pending), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(pending[-k:]) for s in self.stop):
                return k
        return 0
