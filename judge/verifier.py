"""The verifier judge: scores a response against the constraints in its prompt's task.

`score(task, text)` is the mean of one score in [0, 1] per constraint. Most
constraints give partial credit, so that among a prompt's samples the one
that is closer to the request still wins a preference pair:

- max_words n: 1 up to n words, then falling linearly to 0 at 2n words.
  Words are runs of letters/digits (apostrophes inside a word keep it one
  word; a bullet's "-" is not a word).
- lowercase: the fraction of words without a capital letter.
- include_word w: 1 if w appears as a whole word (any case), else 0.
- end_with p: 1 if the answer ends with p (case and surrounding whitespace,
  quotes and asterisks ignored); 0.5 if it does once the final punctuation of
  both is ignored ("That is all!" for "that is all."); 0.25 if p occurs
  elsewhere; else 0.
- no_commas: 1 - commas/4, at least 0.
- min_words n: 1 from n words up, else words / n (so one word of eight
  scores 0.125).
- bullet_points n [min_words m]: 1 for exactly n lines starting with "- ",
  else 1 - |lines - n| / n, at least 0; lines marked otherwise ("* ", "• ",
  "+ ", "1. ", "1) ") earn half of that, when it is more. With `min_words`,
  that is multiplied by the share of bullets with at least m words (a bullet
  "- a" is no answer).
- on_topic words: 1 if one of the words appears as a whole word (any case),
  else 0.

A blank answer (no words at all) scores 0 on every constraint: otherwise an
empty reply would satisfy "at most 20 words", "lowercase" and "no commas" at
once, and DPO would learn to say nothing.

The format families (numbered lists, sections, JSON, titles, ...) are
checked in judge/verifier_formats.py, which says how each scores.

Tasks of another kind, or malformed constraints, raise `ValueError`: the
judge service dead-letters such candidate sets.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from judge import verifier_formats
from judge.text import closeness, content_share, include_count, nonblank_str, positive_int, words

TASK_KIND = "constraints"

_TRAILING_NOISE = "\"'*`” \t\r\n"
_END_PUNCT = ".!?;:…"
_OTHER_BULLET = re.compile(r"^(?:[*•+]\s|\d{1,2}[.)]\s)")


def _max_words(text: str, n: int) -> float:
    count = len(words(text))
    return 1.0 if count <= n else max(0.0, 1.0 - (count - n) / n)


def _min_words(text: str, n: int) -> float:
    return min(1.0, len(words(text)) / n)


def _on_topic(text: str, words: list[str]) -> float:
    return 1.0 if any(_include_word(text, w) for w in words) else 0.0


def _lowercase(text: str) -> float:
    ws = words(text)
    return sum(1 for w in ws if w == w.lower()) / len(ws)


def _include_word(text: str, word: str) -> float:
    return 1.0 if include_count(text, word) else 0.0


def _normalize(s: str) -> str:
    return " ".join(s.split()).lower()


def _end_with(text: str, phrase: str) -> float:
    body, want = _normalize(text).rstrip(_TRAILING_NOISE), _normalize(phrase)
    if body.endswith(want):
        return 1.0
    bare_body, bare_want = body.rstrip(_END_PUNCT + _TRAILING_NOISE), want.rstrip(_END_PUNCT + _TRAILING_NOISE)
    if bare_want and bare_body.endswith(bare_want):
        return 0.5
    if bare_want and bare_want in body:
        return 0.25
    return 0.0


def _no_commas(text: str) -> float:
    return max(0.0, 1.0 - (text.count(",") + text.count("，")) / 4)


def _bullet_points(text: str, n: int, min_words: int | None = None) -> float:
    lines = [line.lstrip() for line in text.splitlines()]
    dashes = [line for line in lines if line.startswith("- ")]
    others = [line for line in lines if _OTHER_BULLET.match(line)]
    best = max((closeness(len(dashes), n) * content_share(dashes, min_words), dashes),
               (0.5 * closeness(len(others), n) * content_share(others, min_words), others), key=lambda x: x[0])
    return best[0]


def _word_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(nonblank_str(w) for w in v)


def _optional_positive(v: Any) -> bool:
    return v is None or positive_int(v)


# type -> (check, {field: validator}); each check gets the text and the fields as keyword arguments.
_CONSTRAINTS: dict[str, tuple[Callable[..., float], dict[str, Callable[[Any], bool]]]] = {
    "max_words": (_max_words, {"n": positive_int}),
    "lowercase": (_lowercase, {}),
    "include_word": (_include_word, {"word": nonblank_str}),
    "end_with": (_end_with, {"phrase": nonblank_str}),
    "no_commas": (_no_commas, {}),
    "bullet_points": (_bullet_points, {"n": positive_int, "min_words": _optional_positive}),
    "min_words": (_min_words, {"n": positive_int}),
    "on_topic": (_on_topic, {"words": _word_list}),
    **verifier_formats.CONSTRAINTS,
}


def topic_words(task: Any) -> list[str] | None:
    """The words naming the task's topic (its `on_topic` constraint), or None when it states none."""
    if not isinstance(task, dict) or not isinstance(task.get("constraints"), list):
        return None
    for c in task["constraints"]:
        if isinstance(c, dict) and c.get("type") == "on_topic" and _word_list(c.get("words")):
            return list(c["words"])
    return None


def on_topic(text: str, words: list[str]) -> bool:
    """True when `text` names one of `words` (whole words, any case)."""
    return _on_topic(text, words) == 1.0


def parse_constraints(task: Any) -> list[dict[str, Any]]:
    """The task's constraints, checked; `ValueError` says what is wrong."""
    if not isinstance(task, dict):
        raise ValueError(f"task must be a mapping, got {type(task).__name__}")
    kind = task.get("kind")
    if kind != TASK_KIND:
        raise ValueError(f"the verifier judges tasks of kind {TASK_KIND!r}, got kind {kind!r}")
    constraints = task.get("constraints")
    if not isinstance(constraints, list) or not constraints:
        raise ValueError("task.constraints must be a non-empty list")
    for i, c in enumerate(constraints):
        if not isinstance(c, dict):
            raise ValueError(f"constraint {i} must be a mapping, got {type(c).__name__}")
        ctype = c.get("type")
        if ctype not in _CONSTRAINTS:
            raise ValueError(f"constraint {i}: unknown type {ctype!r} (known: {', '.join(_CONSTRAINTS)})")
        fields = _CONSTRAINTS[ctype][1]
        extra = set(c) - set(fields) - {"type"}
        if extra:
            raise ValueError(f"constraint {i} ({ctype}): unexpected field(s) {sorted(extra)}")
        for name, ok in fields.items():
            if not ok(c.get(name)):
                raise ValueError(f"constraint {i} ({ctype}): field {name!r} is missing or invalid: {c.get(name)!r}")
    return constraints


def _label(c: dict[str, Any]) -> str:
    if c["type"] == "on_topic":  # the word list makes a long label; the first word names the topic
        return f"on_topic({c['words'][0]})"
    if c["type"] == "repeat_request":  # the request is long; it is in the prompt
        return "repeat_request"
    args = ",".join(f"{k}={c[k]}" for k in sorted(c) if k != "type")
    return f"{c['type']}({args})" if args else c["type"]


def score_constraints(task: Any, text: str) -> dict[str, float]:
    """Per-constraint scores, keyed like `max_words(n=20)` (a `#2` suffix on repeats)."""
    constraints = parse_constraints(task)
    blank = not words(text)
    out: dict[str, float] = {}
    for c in constraints:
        label = _label(c)
        k = 2
        while label in out:
            label = f"{_label(c)}#{k}"
            k += 1
        check, fields = _CONSTRAINTS[c["type"]]
        out[label] = 0.0 if blank else float(check(text, **{name: c[name] for name in fields if name in c}))
    return out


def score(task: Any, text: str) -> float:
    """Mean constraint score of `text` in [0, 1]; `ValueError` for tasks it cannot judge."""
    per = score_constraints(task, text)
    return sum(per.values()) / len(per)


def strict_pass(task: Any, text: str) -> bool:
    """True when `text` meets every constraint in full."""
    return all(v >= 1.0 for v in score_constraints(task, text).values())
