"""Preference pairs from a JSONL file, one pair per line, each error tied to its line number.

A line is one JSON object in either form:
- TRL's preference format: `{"prompt": ..., "chosen": ..., "rejected": ...}`
  where all three are strings (plain text; EOS is appended as TRL does), or
  the prompt is a list of chat messages and chosen/rejected are strings or a
  list holding one assistant message (conversational; the chat template is
  applied). An optional string `"id"` names the pair; other keys are ignored
  (datasets carry extra columns).
- a `PreferencePair` as on odpo.preferences (recognised by its `judge` key),
  e.g. pairs dumped from the topic; its token ids are used when present.
Pairs without an id get the deterministic `pair_id` of their content, so a
second run over the same file finds them in the ledger.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.contracts import PreferencePair
from core.dataset_load import pair_from_line


class BadLine(ValueError):
    """A line that does not hold a usable pair."""

    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason = line, reason


@dataclass(frozen=True)
class Line:
    number: int
    pair: PreferencePair


def read_pairs(path: Path) -> Iterator[Line | BadLine]:
    """Each non-blank line of `path` as a `Line`, or a `BadLine` saying what is wrong with it."""
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield BadLine(number, f"not JSON ({exc.msg} at column {exc.colno})")
                continue
            try:
                yield Line(number, pair_from_record(record))
            except (ValueError, TypeError) as exc:
                yield BadLine(number, _reason(exc))


def pair_from_record(record: Any) -> PreferencePair:
    """A `PreferencePair` from one decoded line (either form); ValueError says why not.

    The forms and ids are those of `odpo pairs load` (core/dataset_load.py), so a file trained
    offline and the same file loaded onto odpo.preferences give the same pair ids (the ledger dedupes).
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")  # noqa: TRY004 -- a bad line
    return pair_from_line(record)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
    return str(exc)
