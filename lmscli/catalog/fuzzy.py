"""The npm ``fuzzy`` package's ``filter`` as ``lms load`` uses it to resolve model keys.

Scores must match lms exactly so the same query picks the same model: a run of consecutive
matched characters scores 1, 3, 7, 15... (each adds one plus the previous bonus) and any other
character resets the bonus. An exact (case-insensitive) match outranks everything.
"""

from __future__ import annotations

import sys

EXACT_MATCH_SCORE = sys.maxsize  # npm fuzzy uses Infinity


def fuzzy_score(pattern: str, text: str) -> int | None:
    """The score of ``text`` for ``pattern``, or None when it is not a subsequence."""
    pat = pattern.lower()
    low = text.lower()
    if pat == low:
        return EXACT_MATCH_SCORE
    pi = 0
    bonus = 0
    total = 0
    for ch in low:
        if pi < len(pat) and ch == pat[pi]:
            pi += 1
            bonus += 1 + bonus
        else:
            bonus = 0
        total += bonus
    return total if pi == len(pat) else None


def fuzzy_filter(pattern: str, items: list[str]) -> list[tuple[str, int]]:
    """Items matching ``pattern`` with their scores, best first; ties keep input order."""
    if not pattern:
        return [(item, 0) for item in items]
    scored = []
    for index, item in enumerate(items):
        score = fuzzy_score(pattern, item)
        if score is not None:
            scored.append((score, index, item))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [(item, score) for score, _, item in scored]
