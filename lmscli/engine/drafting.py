"""Draft-free speculative decoding: guesses of a sequence's next tokens, looked up in what it
has already read and written (prompt lookup), for the step loop to verify in one decode.

A sequence that copies its input (a rewrite, an edit, quoted text, JSON with repeated keys)
finds its recent tokens earlier in its context; the tokens that followed them there are the
draft. The draft grows while guesses are accepted and shrinks to nothing while they are not,
so text with nothing to copy costs one dictionary lookup a token.
"""

from __future__ import annotations

from collections.abc import Sequence

# A guess costs a CPU nearly as much as a token decoded alone: only a long match is trusted
NGRAM_MIN = 4  # the shortest run of recent tokens a guess is looked up by
NGRAM_MAX = 8
DRAFT_MAX = 32  # most tokens guessed at once
DRAFT_START = 8
PAUSE_STEPS = 8  # steps without drafting after a draft is wholly rejected


class Drafter:
    """One sequence's n-gram index over its context, and its adaptive draft length."""

    def __init__(self, context: Sequence[int]) -> None:
        self.tokens: list[int] = []
        # each n-gram seen, with where its latest occurrence ends
        self.ends: dict[tuple[int, ...], int] = {}
        self.length = DRAFT_START
        self.pause = 0
        self.extend(context)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(NGRAM_MIN, min(NGRAM_MAX, end) + 1):
                self.ends[tuple(self.tokens[end - n:end])] = end - 1

    def draft(self, last: int, room: int) -> list[int]:
        """Up to ``room`` guessed tokens to follow ``last`` (which ends the context but is not
        yet in ``tokens``): what followed the longest recent n-gram ending in ``last``."""
        if self.pause:
            self.pause -= 1
            return []
        want = min(self.length, room)
        if want <= 0:
            return []
        for n in range(min(NGRAM_MAX, len(self.tokens) + 1), NGRAM_MIN - 1, -1):
            key = (*self.tokens[len(self.tokens) - n + 1:], last)
            end = self.ends.get(key)
            if end is not None and end + 1 < len(self.tokens):
                return self.tokens[end + 1:end + 1 + want]  # what followed it then
        return []

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt the draft length to how much of the last draft was accepted."""
        if not drafted:
            return
        if accepted == drafted:
            self.length = min(DRAFT_MAX, self.length * 2)
        elif accepted == 0:
            self.length = max(1, self.length // 2)
            self.pause = PAUSE_STEPS
        else:
            self.length = max(1, accepted + 1)
