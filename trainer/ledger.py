"""The trained ledger for audits: `<store>/ledger/trained.jsonl`, one line per version the trainer wrote.

A line is `{"version": N, "pair_ids": [...], "at": <unix seconds>}`: the pairs
the update that made version N trained. The line is appended (and fsynced)
while version N is still staged, before its folder is renamed into place, so
every version in the store has its line even when retention has deleted
older folders (their `trainer_state.json` with them). A trainer killed
between the append and the rename makes version N again from replayed pairs
and appends a second line for N: readers take the last line per version, and
ignore lines of versions newer than the newest one in the store (written,
never renamed into place).

A chaos run proves "no pair trained twice" with `trained_ledger`: the ids of
all its versions, concatenated, hold no repeat.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from core.adapter_store import published_versions

log = logging.getLogger(__name__)

LEDGER_DIR = "ledger"
LEDGER_FILE = "trained.jsonl"


def ledger_path(store: Path) -> Path:
    return Path(store) / LEDGER_DIR / LEDGER_FILE


def append_trained(store: Path, version: int, pair_ids: Sequence[str]) -> None:
    """Append version `version`'s line and fsync it (raises OSError when the disk refuses)."""
    path = ledger_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"version": int(version), "pair_ids": list(pair_ids), "at": round(time.time(), 3)}) + "\n"
    fresh = not path.exists()
    with open(path, "ab") as f:
        if f.tell() > 0 and not _ends_with_newline(path):  # a killed append left half a line: end it
            f.write(b"\n")
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())
    if fresh:
        _fsync_dir(path.parent)


def trained_ledger(store: Path) -> dict[int, list[str]]:
    """version -> the pair ids its update trained (the last line of each version wins).

    Lines of versions newer than the newest version in the store are left out (a crash came between
    their append and their rename); a torn or unreadable line is skipped with a warning.
    """
    path = ledger_path(store)
    if not path.is_file():
        return {}
    versions = published_versions(store)
    newest = versions[-1] if versions else 0
    out: dict[int, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                version, ids = int(row["version"]), [str(i) for i in row["pair_ids"]]
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s:%d: unreadable ledger line skipped (%s)", path, number, exc)
                continue
            out[version] = ids
    return {v: ids for v, ids in sorted(out.items()) if v <= newest}


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
