"""Turning generated pieces into text that is safe to stream when stop strings exist."""

from __future__ import annotations

import codecs


class StopMatcher:
    """Holds back text that could be the start of a stop string.

    ``feed`` returns the text that can be emitted now and, once a stop string appears, the
    stop string itself (the text after it is dropped).
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf, None
        hit = self._first_stop(buf)
        if hit is not None:
            at, stop = hit
            self._held = ""
            return buf[:at], stop
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        found = [(buf.find(s), s) for s in self.stops if s in buf]
        return min(found) if found else None

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest end of ``buf`` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if stop.startswith(buf[-n:]):
                    best = n
                    break
        return best


class Utf8Stream:
    """Decodes token bytes, keeping a split multi-byte character until it is complete."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
