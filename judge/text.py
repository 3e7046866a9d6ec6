"""What the rule checks count in a text: words, whole-word occurrences, how close a count is to the one asked."""

from __future__ import annotations

import re
from typing import Any

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    """The words of a text, as the word-count constraints count them (a bullet's "-" is not a word)."""
    return _WORD.findall(text)


def include_count(text: str, word: str) -> int:
    """How often `word` occurs as a whole word, any case."""
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE))


def closeness(count: int, n: int) -> float:
    """1 for exactly n, falling by 1/n per item too many or too few, at least 0."""
    return max(0.0, 1.0 - abs(count - n) / n)


def content_share(parts: list[str], min_words: int | None) -> float:
    """Share of parts with at least `min_words` words (1 when no minimum is asked or there are no parts)."""
    if not min_words or not parts:
        return 1.0
    return sum(1 for b in parts if len(words(b)) >= min_words) / len(parts)


def positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def nonblank_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())
