"""Repair pairs: a sampled answer with what its prompt asked done to it, preferred over the answer as sampled.

A small model rarely samples the formats a prompt asks for (four samples of
"write in capitals" hold no capitals at all), so best-against-worst pairs
differ in everything but what the prompt asked and teach nothing about it.
A repair pair differs in exactly that: its chosen side is the best sampled
answer with each constraint that a mechanical edit can meet met, and its
rejected side is that answer as sampled. The words stay the policy's own;
only what the prompt controls changes (SPaR, ICLR 2025, shows such
minimal-difference pairs teach instruction following better than
independent samples).

What an edit can meet (the rest is left as it is, and still judged):
- forbid_word: the sentences holding the word are dropped (never all of them);
- max_sentences / max_words: the first sentences that fit are kept;
- an answer the token limit cut mid-sentence loses that last, unfinished sentence when something must
  follow it (an end phrase, a P.S., a closing quotation mark) or it would count as one more;
- postscript: the last sentence moves into a closing line "P.S. ..." (2 sentences or more);
- bullet_points / numbered_list / paragraphs / sections: the sentences laid out as asked (as many
  sentences as parts, or more: the first ones make the parts, the rest joins the last part);
- two_responses: this answer and another sampled one, a "******" line between them;
- highlights: the first sentences wrapped in *asterisks*;
- title: <<the topic>> on a line of its own first; start_with / repeat_request: the phrase or the request
  first; end_with: the phrase last;
- json: {"answer": ...}; quoted: in double quotation marks; no_commas, lowercase, uppercase.

Content the model has to write itself (a keyword n times, a topic word, more words, [placeholders]) is
not invented: a template sentence would teach templates.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from judge.surface import surface_form
from judge.text import include_count, words
from judge.verifier_formats import section_header

_SENTENCE = re.compile(r"[^.!?…]*[^\s.!?…][^.!?…]*(?:[.!?…]+[\"'”)\]]*|$)")
_LETTER = re.compile(r"[^\W\d_]")
_TITLE = re.compile(r"<<[^<>\n]*>>")
_CLAIM_END = {"end_with", "postscript", "quoted", "json", "max_sentences", "paragraphs", "sections"}
_DIVIDER = re.compile(r"^\*{3,}$")  # the "***" between paragraphs, the "******" between two answers
_LAYOUTS = ("bullet_points", "numbered_list", "paragraphs", "sections")


def sentences(text: str) -> list[str]:
    """The text's sentences, whitespace folded, those without a letter left out ("1." of a list); a last one
    without an end mark is kept as it is."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE.findall(flat) if _LETTER.search(s)]


def _finished(s: str) -> bool:
    return s.rstrip("\"'”)]").endswith((".", "!", "?", "…"))


def _groups(items: list[str], n: int) -> list[str] | None:
    """`items` in n parts: one each, the rest joining the last; None when there are fewer than n."""
    if len(items) < n:
        return None
    return items[: n - 1] + [" ".join(items[n - 1:])]


def _lower_first(s: str) -> str:
    first = s.split(" ", 1)[0]
    return s if first == "I" or first.startswith("I'") or first.isupper() and len(first) > 1 else s[:1].lower() + s[1:]


def _content(cs: dict[str, dict], text: str) -> list[str]:
    """The answer's sentences after the content edits (may be empty: nothing left to repair)."""
    parts = sentences(text)
    if len(parts) > 1 and not _finished(parts[-1]) and _CLAIM_END & cs.keys():
        parts = parts[:-1]  # cut by the token limit mid-sentence, where something must come after it
    if "forbid_word" in cs:
        kept = [s for s in parts if not include_count(s, cs["forbid_word"]["word"])]
        parts = kept or parts
    if "max_sentences" in cs:
        parts = parts[: cs["max_sentences"]["n"]]
    if "max_words" in cs:
        left, kept = cs["max_words"]["n"], []
        for s in parts:
            left -= len(words(s))
            if left < 0:
                break
            kept.append(s)
        parts = kept or parts[:1]
    return parts


def _layout(cs: dict[str, dict], parts: list[str], others: Sequence[str], task: Any, text: str) -> str:
    kind = next((k for k in _LAYOUTS if k in cs), None)
    groups = _groups(parts, cs[kind]["n"]) if kind else None
    if kind == "bullet_points" and groups:
        return "\n".join(f"- {g}" for g in groups)
    if kind == "numbered_list" and groups:
        return "\n".join(f"{i}. {g}" for i, g in enumerate(groups, 1))
    if kind == "paragraphs" and groups:
        return "\n\n***\n\n".join(groups)
    if kind == "sections" and groups:
        marker = cs["sections"]["marker"]
        return "\n\n".join(f"{marker} {i}\n{g}" for i, g in enumerate(groups, 1))
    body = " ".join(parts)
    if "two_responses" in cs:
        second = next((" ".join(sentences(surface_form(task, o))) for o in others
                       if o != text and words(o)), None)
        if second and second.lower() != body.lower():
            return f"{body}\n******\n{second}"
    return body


def _highlight(body: str, n: int, marker: str | None) -> str:
    """The first n sentences (on any line) wrapped in single asterisks; list markers, dividers and the
    `marker` section headers of the layout stay as they are."""
    done = 0

    def wrap(m: re.Match) -> str:
        nonlocal done
        if done >= n or not words(m.group(0)):
            return m.group(0)
        done += 1
        core = m.group(0).strip()
        lead, tail = m.group(0).split(core, 1)
        return f"{lead}*{core}*{tail}"

    lines = []
    for line in body.split("\n"):
        if _DIVIDER.match(line) or marker and re.match(section_header(marker) + "$", line):
            lines.append(line)
            continue
        head = re.match(r"^(?:- |\d{1,2}\. )", line)
        start = head.end() if head else 0
        lines.append(line[:start] + _SENTENCE.sub(wrap, line[start:]))
    return "\n".join(lines)


def repair(task: Any, text: str, others: Sequence[str] = ()) -> str | None:
    """`text` with every constraint of `task` that an edit can meet met (module docstring), or None when
    nothing changed or nothing of the answer is left to work with. `others`: the prompt's other samples
    (a second answer for two_responses). The task must be valid (judge.verifier.parse_constraints)."""
    cs = {c["type"]: c for c in task["constraints"]}
    parts = _content(cs, surface_form(task, _TITLE.sub("", text)))  # a title of its own comes back below
    if not parts:
        return None
    ps = None
    if "postscript" in cs and len(parts) >= 2:
        ps = f"{cs['postscript']['marker']} {parts.pop()}"
    body = _layout(cs, parts, others, task, text)
    if "highlights" in cs:
        body = _highlight(body, cs["highlights"]["n"], cs.get("sections", {}).get("marker"))
    if "start_with" in cs:
        phrase = cs["start_with"]["phrase"]
        if not body.lower().startswith(phrase.lower()):
            glue = "\n" if "\n" in body else ". " if len(phrase.split()) > 2 else ", "  # a layout: its own line
            body = f"{phrase}{glue}{_lower_first(body) if glue == ', ' else body}"
    if "title" in cs and "on_topic" in cs:
        body = f"<<{cs['on_topic']['words'][0].title()}>>\n\n{body}"
    if "repeat_request" in cs:
        body = f"{cs['repeat_request']['text']}\n{body}"
    if ps:
        body = f"{body}\n\n{ps}"
    if "end_with" in cs:
        body = f"{body.rstrip()} {cs['end_with']['phrase']}"
    if "json" in cs:
        body = json.dumps({"answer": body}, ensure_ascii=False)
    if "quoted" in cs:
        body = f'"{body}"'
    if "no_commas" in cs:
        body = re.sub(r"\s*[,，]\s*", " ", body)
    if "lowercase" in cs:
        body = body.lower()
    elif "uppercase" in cs:
        body = body.upper()
    return None if body.strip() == text.strip() else body
