"""Token ids -> text as it streams, with stop strings: only text that can no longer change is
released (a partial UTF-8 character, or a tail that may be the start of a stop string, waits for
the next tokens), and the text ends right before the first stop string."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete multi-byte character


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.stopped = False  # a stop string was met: nothing more is released

    def feed(self, tokens) -> str:
        """Add tokens; returns the newly released text."""
        if self.stopped:
            return ""
        self.tokens.extend(int(t) for t in tokens)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(full[:min(hits)])
        end = len(full.rstrip(REPLACEMENT))
        safe = end
        for s in self.stop:  # hold back the longest tail that begins a stop string
            held = next((k for k in range(min(len(s) - 1, end), 0, -1) if full[:end].endswith(s[:k])), 0)
            safe = min(safe, end - held)
        return self._release(full[:safe])

    def finish(self) -> str:
        """The text still held back once the sequence has ended (no stop string followed)."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        new, self.text = upto[len(self.text):], upto
        return new
