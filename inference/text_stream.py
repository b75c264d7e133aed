"""Token ids -> text as it streams, with stop strings: only text that can no longer change is
released (a partial UTF-8 character, or a tail that may be the start of a stop string, waits for
the next tokens), and the text ends right before the first stop string."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete multi-byte character
CONTEXT = 6  # settled tokens decoded again before new ones: some decoders print a sequence's first token differently


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self._settled, self._settled_text = 0, ""  # tokens[:settled] decode to settled_text for good
        self.stopped = False  # a stop string was met: nothing more is released

    def feed(self, tokens) -> str:
        """Add tokens; returns the newly released text."""
        if self.stopped:
            return ""
        self.tokens.extend(int(t) for t in tokens)
        full = self._decoded()
        # Released text holds no stop string nor the start of one, so a match begins after it.
        hits = [i for i in (full.find(s, len(self.text)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(full[:min(hits)])
        end = len(full.rstrip(REPLACEMENT))
        safe = end
        for s in self.stop:  # hold back the longest tail that begins a stop string
            held = next((k for k in range(min(len(s) - 1, end), 0, -1) if full.endswith(s[:k], 0, end)), 0)
            safe = min(safe, end - held)
        return self._release(full[:safe])

    def finish(self) -> str:
        """The text still held back once the sequence has ended (no stop string followed)."""
        if self.stopped:
            return ""
        return self._release(self._decoded())

    def _decoded(self) -> str:
        """The text of every token so far, decoding only the new ones (with a few settled ones
        before them for context) instead of the whole answer at every step."""
        decode = self.tokenizer.decode
        start = max(self._settled - CONTEXT, 0)
        head = decode(self.tokens[start:self._settled], skip_special_tokens=True)
        tail = decode(self.tokens[start:], skip_special_tokens=True)
        if tail.startswith(head):
            full = self._settled_text + tail[len(head):]
        else:  # the context decodes differently on its own: decode the whole answer
            full = decode(self.tokens, skip_special_tokens=True)
        if not full.endswith(REPLACEMENT):  # no character is cut in two: what is here stays
            self._settled, self._settled_text = len(self.tokens), full
        return full

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        new, self.text = upto[len(self.text):], upto
        return new
