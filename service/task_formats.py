"""The format families of the bundled task: what clients and public instruction-following benchmarks ask for.

The first bundled constraints (word range, lowercase, a word, an ending, no
commas, bullets) cover a few of the instructions people give. This module adds
the other families, each stated in the project's own words and checked by the
verifier (judge/verifier_formats.py):

    {"type": "keyword_count", "word": str, "n": int}   the word at least n times
    {"type": "forbid_word", "word": str}               the word never appears
    {"type": "max_sentences", "n": int}                at most n sentences
    {"type": "paragraphs", "n": int}                   n paragraphs, a line "***" between them
    {"type": "numbered_list", "n": int}                exactly n lines "1. ", "2. ", ... with content
    {"type": "sections", "n": int, "marker": str}      n parts headed "<marker> 1", "<marker> 2", ...
    {"type": "title"}                                  a title in double angle brackets: <<...>>
    {"type": "json"}                                   the whole answer is JSON
    {"type": "highlights", "n": int}                   at least n *highlighted* phrases
    {"type": "uppercase"}                              capital letters only
    {"type": "start_with", "phrase": str}              the answer starts with the phrase
    {"type": "postscript", "marker": str}              a closing line that starts with the marker (P.S.)
    {"type": "placeholders", "n": int}                 at least n [square bracket] blanks
    {"type": "repeat_request", "text": str}            the request (first sentence) copied, then the answer
    {"type": "two_responses"}                          two different answers, "******" between them
    {"type": "quoted"}                                 the whole answer in double quotation marks

`draw(rng, request)` picks one to three compatible constraints (never two
layouts, never two things that claim the answer's first or last characters,
never a case that a marker contradicts). A test checks that no prompt these
words make shares an 8-gram with the public benchmark `odpo eval` scores
(the loop never trains on a benchmark's prompts).
"""

from __future__ import annotations

import random
from typing import Any

FORMAT_TYPES = ("keyword_count", "forbid_word", "max_sentences", "paragraphs", "numbered_list", "sections", "title",
                "json", "highlights", "uppercase", "start_with", "postscript", "placeholders", "repeat_request",
                "two_responses", "quoted")
# The basic constraints a format prompt may also carry (service/task.py states and draws them).
BASIC_TYPES = ("max_words", "lowercase", "include_word", "end_with", "no_commas", "bullet_points")

KEYWORDS = ("time", "people", "always", "little", "every", "world", "feel", "place")
FORBIDDEN = ("very", "really", "also", "many", "just", "great")
START_PHRASES = ("Sure", "In short", "Here is my answer", "Well")
POSTSCRIPTS = ("P.S.", "P.P.S.")
SECTION_MARKERS = ("Part", "Section")

# Answers in several parts (a word limit needs room for them).
MULTI_PART = frozenset({"bullet_points", "numbered_list", "sections", "paragraphs", "two_responses"})
# At most one of each group: they all decide the answer's layout, its first characters, its last ones.
_GROUPS = (
    MULTI_PART | {"json"},
    {"start_with", "repeat_request", "title", "quoted", "json"},
    {"end_with", "postscript", "quoted", "json", "bullet_points", "numbered_list"},
    {"lowercase", "uppercase"},
)
# Pairs that contradict each other or a marker the other needs.
_CONFLICTS = {
    frozenset(p) for p in (
        ("lowercase", "postscript"), ("lowercase", "sections"), ("json", "no_commas"), ("json", "highlights"),
        ("json", "placeholders"), ("json", "max_sentences"), ("repeat_request", "max_words"),
        ("repeat_request", "max_sentences"), ("max_sentences", "bullet_points"), ("max_sentences", "numbered_list"),
        ("max_sentences", "sections"), ("max_sentences", "paragraphs"), ("max_sentences", "two_responses"),
        ("uppercase", "placeholders"), ("two_responses", "title"),
    )
}


def compatible(kinds: list[str]) -> bool:
    for group in _GROUPS:
        if len(group.intersection(kinds)) > 1:
            return False
    return not any(frozenset((a, b)) in _CONFLICTS for i, a in enumerate(kinds) for b in kinds[i + 1:])


# What a user turn states for each format constraint, filled from its fields.
_STATED = {
    "keyword_count": 'The word "{word}" must appear {n} or more times.',
    "forbid_word": 'Avoid the word "{word}" entirely.',
    "max_sentences": "Keep it to {n} sentences or fewer.",
    "paragraphs": "Give {n} paragraphs, with a line holding only *** between each two.",
    "numbered_list": "Give a numbered list of exactly {n} items (1. 2. and so on), each a short sentence.",
    "sections": 'Split it into {n} parts headed "{marker} 1", "{marker} 2" and so on.',
    "title": "Begin with a title in double angle brackets, such as <<A Title>>.",
    "json": "Reply only with a JSON object.",
    "highlights": "Mark {n} phrases as *highlighted* by putting single asterisks around them.",
    "uppercase": "Write everything in capital letters.",
    "start_with": 'Begin your answer with the words "{phrase}".',
    "postscript": 'Close with a note that starts with "{marker}".',
    "placeholders": "Leave {n} blanks in square brackets for me to fill in, such as [name].",
    "repeat_request": "Before answering, copy my first sentence word for word.",
    "two_responses": "Give two different answers with a line of six asterisks (******) between them.",
    "quoted": "Put the whole answer inside double quotation marks.",
}


def describe(c: dict[str, Any]) -> str | None:
    """The sentence a user turn states for a format constraint (None for a type not of this module)."""
    stated = _STATED.get(c["type"])
    return None if stated is None else stated.format(**{k: v for k, v in c.items() if k != "text"})


def constraint(kind: str, rng: random.Random, request: str) -> dict[str, Any]:
    """A format constraint of `kind` with its drawn parameters."""
    if kind == "keyword_count":
        return {"type": kind, "word": rng.choice(KEYWORDS), "n": rng.randint(2, 3)}
    if kind == "forbid_word":
        return {"type": kind, "word": rng.choice(FORBIDDEN)}
    if kind == "max_sentences":
        return {"type": kind, "n": rng.randint(2, 4)}
    if kind in ("paragraphs", "numbered_list"):
        return {"type": kind, "n": rng.randint(2, 3)}
    if kind == "sections":
        return {"type": kind, "n": rng.randint(2, 3), "marker": rng.choice(SECTION_MARKERS)}
    if kind == "highlights":
        return {"type": kind, "n": rng.randint(1, 3)}
    if kind == "start_with":
        return {"type": kind, "phrase": rng.choice(START_PHRASES)}
    if kind == "postscript":
        return {"type": kind, "marker": rng.choice(POSTSCRIPTS)}
    if kind == "placeholders":
        return {"type": kind, "n": rng.randint(1, 3)}
    if kind == "repeat_request":
        return {"type": kind, "text": request}
    return {"type": kind}


def draw_kinds(rng: random.Random) -> list[str]:
    """One format type, and up to two more of any family, all compatible."""
    count = rng.randint(1, 3)
    while True:
        kinds = [rng.choice(FORMAT_TYPES)] + rng.sample(FORMAT_TYPES + BASIC_TYPES, count - 1)
        if len(set(kinds)) == len(kinds) and compatible(kinds):
            return kinds
