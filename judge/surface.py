"""An answer's surface form: what its prompt's constraints control, normalised away (judge/fluency.py scores it).

The base model's log-prob per token of its own answers falls 0.39 when they
are lowercased as a prompt asked, 0.36 when their commas are removed; markers
such as "***", "Part 1" or <<...>> cost it more. Scored raw, fluency and the
gate's drift limit would punish obeying the prompt. Each constraint type that
changes an answer's surface has its undoing here, applied the same way to
every answer to that prompt, so an obeying and a disobeying answer are scored
on the same words:

- lowercase / uppercase -> sentence case; no_commas -> no commas;
- bullet_points / numbered_list -> no list markers; paragraphs / two_responses -> no "***" / "******" lines;
- sections -> no "Part 1" headers; title -> its words without << >>; highlights -> no asterisks;
- placeholders -> the blank's word without [ ]; quoted -> no outer quotation marks;
- postscript -> no "P.S." marker; json -> its string values as sentences;
- repeat_request -> the copied request removed (copying the prompt is not fluency).
"""

from __future__ import annotations

import json
import re
from typing import Any

from judge.verifier_formats import section_header

_SENTENCE_START = re.compile(r"(^|[.!?]\s+|\n\s*)([a-z])")
_PRONOUN_I = re.compile(r"\bi\b(?=[\s'’.,!?;:]|$)")
_COMMA = re.compile(r"\s*,\s*")
_BULLET = re.compile(r"^[ \t]*(?:[-*•+]|\d{1,2}[.)])[ \t]+", re.MULTILINE)
_DIVIDER = re.compile(r"^[ \t]*\*{3,}[ \t]*$", re.MULTILINE)
_ANGLE = re.compile(r"<<([^<>\n]*)>>")
_SQUARE = re.compile(r"\[([^\[\]\n]*)\]")


def _constraints(task: Any) -> dict[str, dict]:
    constraints = task.get("constraints") if isinstance(task, dict) else None
    if not isinstance(constraints, list):
        return {}
    return {c["type"]: c for c in constraints if isinstance(c, dict) and isinstance(c.get("type"), str)}


def sentence_case(text: str) -> str:
    """Lowercase, then a capital at each sentence's start and for the pronoun "I": the case an answer has
    whether or not it was written in the case its prompt asked for."""
    text = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text.lower())
    return _PRONOUN_I.sub("I", text)


def _json_text(text: str) -> str:
    body = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```")
    try:
        value = json.loads(body)
    except ValueError:
        return text
    leaves: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            leaves.append(v.strip())
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(value)
    return " ".join(s if s.endswith((".", "!", "?")) else s + "." for s in leaves if s) or text


def _drop_request(text: str, request: Any) -> str:
    if not isinstance(request, str) or not request.strip():
        return text
    body = text.lstrip(" \t\r\n\"'*")
    if " ".join(body.split()).lower().startswith(" ".join(request.split()).lower()):
        # the same words, maybe spaced or cased otherwise: drop as many words as the request has
        count = len(request.split())
        return body.split(None, count)[count] if len(body.split(None, count)) > count else ""
    return text


def surface_form(task: Any, text: str) -> str:
    """`text` with the surface its task's constraints control normalised (see the module's docstring)."""
    cs = _constraints(task)
    if "repeat_request" in cs:
        text = _drop_request(text, cs["repeat_request"].get("text"))
    if "json" in cs:
        text = _json_text(text)
    if "bullet_points" in cs or "numbered_list" in cs:
        text = _BULLET.sub("", text)
    if "paragraphs" in cs or "two_responses" in cs:
        text = _DIVIDER.sub("", text)
    if "sections" in cs and isinstance(cs["sections"].get("marker"), str):
        text = re.sub(section_header(cs["sections"]["marker"]) + r"[ \t]*[:.]?[ \t]*", "", text,
                      flags=re.MULTILINE | re.IGNORECASE)
    if "title" in cs:
        text = _ANGLE.sub(lambda m: m.group(1).strip() + ".", text)
    if "highlights" in cs:
        text = text.replace("*", "")
    if "placeholders" in cs:
        text = _SQUARE.sub(r"\1", text)
    if "postscript" in cs and isinstance(cs["postscript"].get("marker"), str):
        text = text.replace(cs["postscript"]["marker"], "")
    if "quoted" in cs:
        text = text.strip().strip("\"“”")
    if "no_commas" in cs:
        text = _COMMA.sub(" ", text)
    if "lowercase" in cs or "uppercase" in cs:
        text = sentence_case(text)
    return text
