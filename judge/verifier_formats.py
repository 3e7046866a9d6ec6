"""Checks of the bundled task's format families (service/task_formats.py), each a score in [0, 1].

Partial credit where an answer can be closer or further (a count off by one
scores more than one off by three), so a prompt's samples still differ and
make a preference pair; content is required where a bare marker would
otherwise pass (a list item, a part or a paragraph needs 3 words; an answer
copied from the request needs 4 words of its own).

- keyword_count w n: min(1, occurrences of w as a whole word, any case / n).
- forbid_word w: 1 when w never appears as a whole word (any case), else 0.
- max_sentences n: 1 up to n sentences, then falling linearly to 0 at 2n.
- paragraphs n: closeness of the number of parts between lines "***" to n, times the share of parts
  with 3 words or more.
- numbered_list n: closeness of the number of lines "1. "/"1) " to n, times the share with content.
- sections n marker: closeness of the number of lines starting "<marker> <number>" to n, times the share
  of sections with content.
- title: 1 when a <<title>> with a word in it appears, 0.5 when it is only the prompt's example
  (<<A Title>>) copied, else 0.
- json: 1 when the answer (inside a ``` fence or not) parses as a JSON object or array, 0.25 when it only
  starts with "{" or "[", else 0.
- highlights n: min(1, *highlighted* or **highlighted** spans / n); a span that holds only the words
  "highlighted", "section", "part", "phrase" and numbers marks nothing of the answer and does not count.
- uppercase: the share of words without a lowercase letter.
- start_with p: 1 when the answer starts with p (case, quotes and markup ignored), 0.25 when p occurs
  elsewhere, else 0.
- postscript m: 1 when a line starts with m, 0.5 when m occurs elsewhere, else 0.
- placeholders n: min(1, [blanks] / n).
- repeat_request t: 1 when the answer starts with t (case and spacing ignored) and goes on for 4 words or
  more, 0.5 when it only starts with t or holds it later, else 0.
- two_responses: 1 for two different parts of 3 words or more around one "******" line, 0.5 when the
  separator is there but a part is missing, empty or the same, else 0.
- quoted: 1 when the stripped answer starts and ends with a double quotation mark, else 0.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from judge.text import closeness, content_share, include_count, positive_int, nonblank_str, words

_SENTENCE_END = re.compile(r"[.!?…]+(?=[\s\"'”)\]]|$)")
_DIVIDER = re.compile(r"^[ \t]*\*\*\*[ \t]*$", re.MULTILINE)
_NUMBERED = re.compile(r"^[ \t]*\d{1,2}[.)][ \t]+(.*)$", re.MULTILINE)
_TITLE = re.compile(r"<<[^<>\n]*\w[^<>\n]*>>")
_HIGHLIGHT = re.compile(r"\*\*[^\n*]+\*\*|\*[^\n*]+\*")
_MARKER_ONLY = re.compile(r"^(?:highlight(?:ed)?|phrase|section|part|\W|\d)*$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")
_FENCE = re.compile(r"^```(?:json|JSON)?\s*(.*?)\s*```$", re.DOTALL)
_LEAD_NOISE = " \t\r\n\"'*`#“"
EXAMPLE_TITLE = "A Title"  # what the prompt shows (service/task_formats.py)


def _flat(s: str) -> str:
    return " ".join(s.split()).lower()


def keyword_count(text: str, word: str, n: int) -> float:
    return min(1.0, include_count(text, word) / n)


def forbid_word(text: str, word: str) -> float:
    return 0.0 if include_count(text, word) else 1.0


def sentence_count(text: str) -> int:
    """Sentences: runs of text ended by . ! ? or the end of the answer (a bare list line is one)."""
    parts = _SENTENCE_END.split(text)
    return sum(1 for p in parts if words(p))


def max_sentences(text: str, n: int) -> float:
    count = sentence_count(text)
    return 1.0 if count <= n else max(0.0, 1.0 - (count - n) / n)


def paragraphs(text: str, n: int) -> float:
    parts = [p for p in _DIVIDER.split(text) if p.strip()]
    return closeness(len(parts), n) * content_share(parts, 3)


def numbered_list(text: str, n: int) -> float:
    items = _NUMBERED.findall(text)
    return closeness(len(items), n) * content_share(items, 3)


def section_header(marker: str) -> str:
    """The pattern of a section's header line start: "Part 2", "## SECTION 2", any case."""
    return rf"^[ \t#*\"“]*{re.escape(marker)}[ \t]+\d+"  # a quoted answer's first header starts with "


def sections(text: str, n: int, marker: str) -> float:
    head = re.compile(section_header(marker) + r"\b", re.MULTILINE | re.IGNORECASE)
    starts = [m.start() for m in head.finditer(text)]
    bodies = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    # a section's content: its words after the header's two ("Part 1")
    return closeness(len(starts), n) * content_share([" ".join(words(b)[2:]) for b in bodies], 3)


def title(text: str) -> float:
    found = [t.strip("<> ").lower() for t in _TITLE.findall(text)]
    if not found:
        return 0.0
    # the prompt's own example copied ("<<A Title>>") is half a title: it names nothing
    return 1.0 if any(t != EXAMPLE_TITLE.lower() for t in found) else 0.5


def json_answer(text: str) -> float:
    body = text.strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    try:
        value = json.loads(body)
    except ValueError:
        return 0.25 if body[:1] in "{[" and body else 0.0
    return 1.0 if isinstance(value, (dict, list)) and value else 0.0


def highlights(text: str, n: int) -> float:
    # a span that only says "highlighted" (or "highlighted section 2") marks none of the answer's words
    spans = [s for s in _HIGHLIGHT.findall(text) if not _MARKER_ONLY.match(s.strip("* "))]
    return min(1.0, len(spans) / n)


def uppercase(text: str) -> float:
    ws = words(text)
    return sum(1 for w in ws if w == w.upper()) / len(ws)


def start_with(text: str, phrase: str) -> float:
    body, want = _flat(text).lstrip(_LEAD_NOISE), _flat(phrase)
    if body.startswith(want):
        return 1.0
    return 0.25 if want in body else 0.0


def postscript(text: str, marker: str) -> float:
    if re.search(rf"^[ \t*]*{re.escape(marker)}", text, re.MULTILINE):
        return 1.0
    return 0.5 if marker in text else 0.0


def placeholders(text: str, n: int) -> float:
    return min(1.0, len(_PLACEHOLDER.findall(text)) / n)


def repeat_request(answer: str, text: str) -> float:
    body, want = _flat(answer).lstrip(_LEAD_NOISE), _flat(text)
    if body.startswith(want):
        return 1.0 if len(words(body[len(want):])) >= 4 else 0.5
    return 0.5 if want in body else 0.0


def two_responses(text: str) -> float:
    if "******" not in text:
        return 0.0
    parts = [p.strip() for p in re.split(r"\*{6,}", text)]
    if len(parts) == 2 and all(len(words(p)) >= 3 for p in parts) and _flat(parts[0]) != _flat(parts[1]):
        return 1.0
    return 0.5


def quoted(text: str) -> float:
    body = text.strip()
    return 1.0 if len(body) > 1 and body[0] in "\"“" and body[-1] in "\"”" else 0.0


def _marker(v: Any) -> bool:
    return nonblank_str(v) and len(v) <= 40


# type -> (check, {field: validator}); each check gets the answer, then the fields as keyword arguments.
CONSTRAINTS: dict[str, tuple[Callable[..., float], dict[str, Callable[[Any], bool]]]] = {
    "keyword_count": (keyword_count, {"word": nonblank_str, "n": positive_int}),
    "forbid_word": (forbid_word, {"word": nonblank_str}),
    "max_sentences": (max_sentences, {"n": positive_int}),
    "paragraphs": (paragraphs, {"n": positive_int}),
    "numbered_list": (numbered_list, {"n": positive_int}),
    "sections": (sections, {"n": positive_int, "marker": _marker}),
    "title": (title, {}),
    "json": (json_answer, {}),
    "highlights": (highlights, {"n": positive_int}),
    "uppercase": (uppercase, {}),
    "start_with": (start_with, {"phrase": nonblank_str}),
    "postscript": (postscript, {"marker": _marker}),
    "placeholders": (placeholders, {"n": positive_int}),
    "repeat_request": (repeat_request, {"text": nonblank_str}),
    "two_responses": (two_responses, {}),
    "quoted": (quoted, {}),
}
