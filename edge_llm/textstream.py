"""Turn a stream of token bytes into safe text deltas.

Two rules make streaming safe for a client that prints each delta at once:
- a token may end in the middle of a multi-byte UTF-8 character (emoji, CJK): those bytes wait
  for the rest of the character;
- text that could be the start of a stop string waits until it is known not to be one, so a
  client never prints something that is later taken back.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        # errors="replace": a model can emit bytes that are not UTF-8 at all; U+FFFD keeps the
        # stream valid instead of failing the request.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # decoded text not yet sent: it may be the start of a stop string
        self.stopped = False  # a stop string was found; nothing more will be emitted

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to send (may be "")."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        if not self._stop:
            out, self._held = self._held, ""
            return out
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = self._partial_stop_suffix()
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(out) :]
        return out

    def finish(self) -> str:
        """The generation ended without a stop string: release the text held back.

        Bytes of a character the model never finished (max_tokens cut it off) are dropped: they
        are not text yet, and a replacement character would only look like damage.
        """
        out, self._held = ("" if self.stopped else self._held), ""
        self._decoder.reset()
        return out

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the held text that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if self._held.endswith(stop[:n]):
                    longest = n
                    break
        return longest
