"""Speculative decoding without a draft model: guesses of a sequence's next tokens, looked up in
text the model has already read or written, for the step loop to verify in one decode.

Where to look: the sequence's own prompt and answer, and the recent ones of the model's other
sequences (a ``DraftPool`` shared by the instance: a retry, an agent's next turn over the same
files, or a request beside it often writes what another one did). What to guess: what followed
the occurrence whose tokens before it match the sequence's own end the longest, token after
token, while the guess stays likely. How much: a decode's time grows with the tokens in its
batch (``StepCost``), so a guess is decoded only while the tokens it is expected to save pay
for the time it adds.

A rewrite changes a name throughout: once the model has written Y where the text it copies has
X twice, the guesses write Y for X as well.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

SCAN = 16  # the most recent occurrences of a token pair looked at, in each context
CANDIDATES = 48  # occurrences followed at once
OTHERS = 8  # other sequences' contexts searched, the most recent first
MATCH_MAX = 64  # the longest run of tokens compared before any occurrence
# ... and before those that match that far: the one that matches furthest back (the model's
# own earlier answer, more than the prompt text it quoted) leads
MATCH_LONG = 1024
DRAFT_CAP = 64  # the most tokens guessed at once
MISS_FLOOR = 0.01  # the least chance that a copied token is not what the model writes
LIKELY = 0.3  # a guess ends where the whole of it is less likely than this
POOL_TOKENS = 1 << 16  # tokens the pool keeps (about 6 MB with their index)
POOL_CONTEXTS = 32
SUBSTITUTE_AFTER = 2  # a replacement the model made this many times is guessed too
CALIBRATION = 0.5  # weight of the prior in the acceptance calibration
FORGET = 0.9  # how fast the calibration follows the sequence's recent drafts
# A decode's time by the tokens in its batch, in one-token steps: measured on 2 CPU cores with
# the default model (medians of 9, a 1,000-token context); a GPU decodes a few tokens more
# for little more than one
CPU_COST = ((1, 1.0), (2, 1.93), (4, 2.93), (8, 5.05), (16, 9.8), (32, 17.8), (64, 29.1),
            (128, 53.8))
GPU_COST = ((1, 1.0), (128, 13.7))


class IndexedTokens:
    """A sequence of tokens, with where each pair of consecutive tokens occurs in it."""

    def __init__(self, tokens: Sequence[int] = ()) -> None:
        self.tokens: list[int] = []
        self.pairs: dict[tuple[int, int], list[int]] = {}  # pair → indexes of its 2nd token
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        own, pairs = self.tokens, self.pairs
        for token in tokens:
            if own:
                pairs.setdefault((own[-1], token), []).append(len(own))
            own.append(token)


class DraftPool:
    """The contexts of a model's recent sequences, running or finished, for each other's
    guesses; the oldest go first beyond ``POOL_TOKENS``."""

    def __init__(self) -> None:
        self.contexts: deque[IndexedTokens] = deque()

    def add(self, context: IndexedTokens) -> None:
        self.contexts.append(context)
        while len(self.contexts) > 1 and (len(self.contexts) > POOL_CONTEXTS or sum(
                len(c.tokens) for c in self.contexts) > POOL_TOKENS):
            self.contexts.popleft()

    def others(self, own: IndexedTokens) -> list[IndexedTokens]:
        return [c for c in reversed(self.contexts) if c is not own][:OTHERS]


class StepCost:
    """A decode's time by the number of tokens in its batch, in one-token steps, joining the
    ``points`` (tokens, steps) by straight lines. A constant per backend rather than timed
    steps, so that the same requests draft alike and get the same answers however busy the
    machine is."""

    def __init__(self, points: tuple[tuple[int, float], ...] = CPU_COST) -> None:
        self.points = points

    def __call__(self, tokens: int) -> float:
        points = self.points
        at = min(max(bisect.bisect_left(points, (tokens, 0.0)), 1), len(points) - 1)
        (k0, t0), (k1, t1) = points[at - 1], points[at]
        return t0 + (t1 - t0) * (tokens - k0) / (k1 - k0)


@dataclass
class StepPlan:
    """The batch being built: its tokens, and how many tokens it is expected to write (one
    for each generating sequence before any guess)."""

    cost: StepCost
    tokens: int = 1
    expected: float = 1.0

    def rate(self, tokens: int, expected: float) -> float:
        """Tokens written a step if the batch took ``tokens`` more, writing ``expected``."""
        return (self.expected + expected) / self.cost(self.tokens + tokens)

    def add(self, tokens: int, expected: float) -> None:
        self.tokens += tokens
        self.expected += expected


def likelihood(match: int, agree: list[int], disagree: list[int]) -> float:
    """How likely the model writes what followed an occurrence whose ``match`` tokens before
    it are the sequence's own end, when other occurrences that match as long as in ``agree``
    followed on alike and those in ``disagree`` did not; an occurrence's say grows with the
    square of its match, so that one long match outweighs several short ones (fitted to
    rewrites, summaries, JSON edits and prose by SmolLM2-135M and Qwen2.5-Coder-0.5B, greedy
    and sampled)."""
    miss = max(MISS_FLOOR, min(0.5, 0.9 / match) * (0.15 if agree else 1.0))
    say = match * match + sum(m * m for m in agree)
    share = say / (say + sum(m * m for m in disagree))
    return (1 - miss) * share ** (0.5 if agree else 1.0)


class Drafter:
    """One generating sequence's guesses: its own context, the pool, what it learned."""

    def __init__(self, context: Sequence[int], pool: DraftPool, *, most: int | None = None,
                 least: int = 0) -> None:
        self.own = IndexedTokens(context)
        self.pool = pool
        self.most = min(most or DRAFT_CAP, DRAFT_CAP)
        self.least = least
        self.subs: dict[int, int] = {}  # a token in copied text → what the model writes for it
        self.origins: dict[int, set[int]] = {}  # the inverse of subs
        self.seen: Counter[tuple[int, int]] = Counter()
        # calibration, by the bit length of the match: breaks the likelihoods predicted, and
        # breaks that happened (a long match can mislead as much as a short one)
        self.predicted: dict[int, float] = {}
        self.happened: dict[int, float] = {}
        self.guessed: list[tuple[float, int]] = []  # the last draft's (likelihood, band)
        self.gain = 0.0  # tokens the last draft is expected to add
        pool.add(self.own)

    def extend(self, tokens: Sequence[int]) -> None:
        self.own.extend(tokens)

    # -- guessing ---------------------------------------------------------------------------

    def draft(self, last: int, room: int, plan: StepPlan) -> list[int]:
        """Guesses to follow ``last`` (which ends the sequence but is not yet in ``own``):
        the longest prefix of the walk worth its place in the batch."""
        drafted: list[int] = []
        guessed: list[tuple[float, int]] = []
        whole, expected = 1.0, 0.0  # the likelihood of the whole guess; tokens it adds
        best, best_rate, best_gain = 0, plan.rate(0, 0.0), 0.0
        for token, p, match in self._walk(last, min(room, self.most)):
            band = match.bit_length()
            whole *= max(0.0, 1 - (1 - p) * self._scale(band))
            if whole < LIKELY:
                break
            drafted.append(token)
            guessed.append((p, band))
            expected += whole
            rate = plan.rate(len(drafted), expected)
            if rate > best_rate:
                best, best_rate, best_gain = len(drafted), rate, expected
        if best < max(1, self.least):
            best, best_gain = 0, 0.0
        self.guessed, self.gain = guessed[:best], best_gain
        return drafted[:best]

    def _scale(self, band: int) -> float:
        """How much likelier a miss is than predicted, for tokens whose match is ``band``
        bits long (as this sequence's drafts went so far)."""
        return self.happened.get(band, CALIBRATION) / self.predicted.get(band, CALIBRATION)

    def _walk(self, last: int, room: int) -> Iterator[tuple[int, float, int]]:
        """Each next guessed token, with its likelihood and its match, following the
        occurrences that agree with the guess so far."""
        found = self._candidates(last)
        # the sequence's own text goes on with ``last`` and the guess: a loop is followed
        # past the end of what it has written
        ahead = [last]
        n = len(self.own.tokens)

        def token_at(context: IndexedTokens, i: int) -> int:
            return context.tokens[i] if i < n or context is not self.own else ahead[i - n]

        for _ in range(room):
            if not found:
                return
            context, at, match = max(found, key=lambda c: c[2])
            token = self._written(token_at(context, at + 1))
            agree = [c for c in found if self._written(token_at(c[0], c[1] + 1)) == token]
            others = [c[2] for c in agree]
            others.remove(match)
            yield token, likelihood(match, others,
                                    [c[2] for c in found if c not in agree]), match
            ahead.append(token)
            found = [(c, i + 1, m + 1) for c, i, m in agree
                     if i + 2 < len(c.tokens) or c is self.own]

    def _candidates(self, last: int) -> list[tuple[IndexedTokens, int, int]]:
        """Occurrences of the sequence's last two tokens (in own, then the pool's), each
        with how many tokens before it match."""
        own = self.own.tokens
        if not own:
            return []
        pairs = [(a, b) for a in self._sources(own[-1]) for b in self._sources(last)]
        found: list[tuple[IndexedTokens, int, int]] = []
        for context in (self.own, *self.pool.others(self.own)):
            for pair in pairs:
                for at in reversed(context.pairs.get(pair, ())[-SCAN:]):
                    if at + 1 < len(context.tokens):
                        found.append((context, at, self._match(context.tokens, at)))
            if len(found) >= CANDIDATES:
                break
        return [(c, at, self._match(c.tokens, at, MATCH_LONG, m) if m == MATCH_MAX else m)
                for c, at, m in found[:CANDIDATES]]

    def _match(self, tokens: list[int], at: int, most: int = MATCH_MAX, match: int = 2) -> int:
        """How many tokens up to ``tokens[at]`` (``match`` known to) are the sequence's own
        end, up to ``most``."""
        own, n = self.own.tokens, len(self.own.tokens)
        while match < most and match <= at and match <= n and \
                self._written(tokens[at - match]) == own[n - match]:
            match += 1
        return match

    def _written(self, token: int) -> int:
        return self.subs.get(token, token)

    def _sources(self, token: int) -> set[int]:
        return {token, *self.origins.get(token, ())}

    # -- learning ---------------------------------------------------------------------------

    def verified(self, accepted: int) -> None:
        """The last draft's first ``accepted`` tokens were the model's."""
        if not self.guessed:
            return
        for band in self.predicted.keys() | self.happened.keys():
            self.predicted[band] = self.predicted.get(band, CALIBRATION) * FORGET
            self.happened[band] = self.happened.get(band, CALIBRATION) * FORGET
        for i, (p, band) in enumerate(self.guessed[:accepted + 1]):
            self.predicted[band] = self.predicted.get(band, CALIBRATION * FORGET) + 1 - p
            self.happened.setdefault(band, CALIBRATION * FORGET)
            if i == accepted:
                self.happened[band] += 1

    def rejected(self, guessed: int, written: int) -> None:
        """The model wrote ``written`` where the draft had ``guessed``."""
        source = next((s for s in self.origins.get(guessed, ())), guessed)
        if source in self.subs:
            if self.subs[source] != written:  # the replacement was wrong here: forget it
                self.origins[self.subs.pop(source)].discard(source)
            return
        if source == written:
            return
        self.seen[source, written] += 1
        if self.seen[source, written] >= SUBSTITUTE_AFTER:
            self.subs[source] = written
            self.origins.setdefault(written, set()).add(source)
