"""`odpo pairs export`: the store's pair archive (trainer/archive.py) as one JSONL dataset.

The archive's files are read in the order they were written, and each pair id
is kept once (its first line: a replay after a crash writes a pair again).
Formats:
- `trl` (default): TRL's preference format, one object per pair:
  `{"id", "prompt", "chosen", "rejected"}` plus extra columns (`prompt_id`,
  `policy_version`, `judged_by`, `chosen_score`, `rejected_score`, `margin`,
  `created_at`). A chat prompt is written conversational (prompt = the chat
  messages, chosen/rejected = a list holding one assistant message), a text
  prompt in TRL's standard form (three strings). TRL wants one form per
  dataset, so when the archive holds both, the text-prompt pairs go to a
  second file beside the first, `<name>.text.jsonl`. `odpo train` and
  `odpo pairs load` read both forms with the same pair ids (the ledger then
  knows pairs it already trained). Token ids are not kept: TRL tokenizes.
- `odpo`: the `PreferencePair` lines themselves (token ids and sampler
  log-probs kept), which `odpo train` and `odpo pairs load` read as well.

A torn last line of a file (a write the process did not live to finish; its
pair was never committed, so it was replayed into a later file) is skipped and
counted. Any other unreadable line, or no archive at all, is an `ExportError`
(the CLI prints one line, exit code 2). The output is written to a temporary
file and renamed into place, so a failed export leaves no half file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from core.contracts import PreferencePair
from trainer.archive import ARCHIVE_DIR, archive_files

FORMATS = ("trl", "odpo")


class ExportError(Exception):
    """The archive cannot be exported as asked; one line for stderr."""


@dataclass
class ExportSummary:
    out: Path
    fmt: str
    written: int = 0
    duplicates: int = 0
    files: int = 0
    torn: int = 0
    text_out: Path | None = None  # trl: the text-prompt pairs, when the archive also holds chat ones
    text_written: int = 0

    def line(self) -> str:
        where = f"{self.out}" + (f" and {self.text_written} text-prompt pairs to {self.text_out}"
                                 if self.text_out is not None else "")
        torn = f", {self.torn} torn last line(s) skipped" if self.torn else ""
        return (f"exported {self.written} pairs ({self.fmt}) to {where}: {self.duplicates} duplicates skipped, "
                f"{self.files} archive files read{torn}")


@dataclass
class _Rows:
    chat: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


def archived_pairs(store: Path, summary: ExportSummary | None = None) -> Iterator[PreferencePair]:
    """Every archived pair in write order, each id once; raises ExportError on an unreadable line."""
    files = archive_files(store)
    if not files:
        raise ExportError(f"{store}: no pair archive (no {ARCHIVE_DIR}/pairs-*.jsonl in it)")
    seen: set[str] = set()
    for path in files:
        if summary is not None:
            summary.files += 1
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError as exc:
            raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                pair = PreferencePair.from_bytes(raw)
            except (ValidationError, ValueError) as exc:
                if number == len(lines):  # no newline after it: a write cut short
                    if summary is not None:
                        summary.torn += 1
                    continue
                raise ExportError(f"{path}:{number}: not a PreferencePair ({_reason(exc)})") from None
            if pair.id in seen:
                if summary is not None:
                    summary.duplicates += 1
                continue
            seen.add(pair.id)
            yield pair


def trl_row(pair: PreferencePair) -> dict:
    """One pair in TRL's preference format (conversational for a chat prompt), with extra columns."""
    if pair.prompt.messages is not None:
        row = {"id": pair.id, "prompt": [m.model_dump() for m in pair.prompt.messages],
               "chosen": [{"role": "assistant", "content": pair.chosen}],
               "rejected": [{"role": "assistant", "content": pair.rejected}]}
    else:
        row = {"id": pair.id, "prompt": pair.prompt.text, "chosen": pair.chosen, "rejected": pair.rejected}
    # never a `judge` key: a line with one is read as a PreferencePair (core/dataset_load.py)
    row.update(prompt_id=pair.prompt.id, policy_version=pair.policy_version, judged_by=pair.judge,
               chosen_score=pair.chosen_score, rejected_score=pair.rejected_score, margin=pair.margin,
               created_at=pair.created_at)
    return row


def export_pairs(store: Path, out: Path, fmt: str = "trl") -> ExportSummary:
    """Write the archive of `store` to `out` in `fmt`; returns what was done (ExportError on bad input)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    store, out = Path(store), Path(out)
    summary = ExportSummary(out, fmt)
    rows = _Rows()
    for pair in archived_pairs(store, summary):
        if fmt == "odpo":
            rows.chat.append(pair.model_dump_json())
        else:
            (rows.chat if pair.prompt.messages is not None else rows.text).append(
                json.dumps(trl_row(pair), ensure_ascii=False))
    if rows.chat and rows.text:
        summary.text_out = out.with_name(f"{out.name.removesuffix('.jsonl')}.text.jsonl")
        _write_lines(summary.text_out, rows.text)
        summary.text_written = len(rows.text)
        main = rows.chat
    else:
        main = rows.chat or rows.text
    _write_lines(out, main)
    summary.written = len(main)
    return summary


def _write_lines(path: Path, lines: list[str]) -> None:
    if not path.parent.is_dir():
        raise ExportError(f"{path.parent}: no such folder")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
    return str(exc).splitlines()[0]
