"""The pair archive: every preference pair that reaches the trainer, appended to `<store>/pairs/`.

The pairs are what a run produces of most value, and Kafka is not a place to
keep them (retention, the memory-only embedded broker). So every valid
`PreferencePair` the trainer reads (trained, stale, duplicate or untrainable
alike) is written once per process as one line of JSON, exactly the contract
message, into JSONL files named by the time they were opened:
`pairs-20261202T112233Z-<pid>-0001.jsonl` (names sort by time; a new file per
process start and whenever one passes `ODPO_TRAINER_ARCHIVE_ROTATE_MB`,
default 64). A pair id is written once per process; a replay after a crash
may write it again in the next process's file, and `odpo pairs export`
(trainer/export.py) keeps the first.

Durability: `sync()` writes what is pending, flushes and fsyncs, and the
trainer calls it before every offset commit, so no committed pair is missing
from the archive.

A failing disk (an OSError on write or fsync, e.g. ENOSPC) loses nothing
silently. The failure is logged at ERROR and counted
(`odpo_trainer_archive_errors_total`); the unwritten lines stay pending in
memory and are retried by later syncs (at most every `retry_s`), and `sync()` answers False, on which
the trainer commits no offsets at all: if the process dies meanwhile, Kafka
replays every pair since the last successful sync, and the archive gets them
then. The trainer goes on training meanwhile (the ledger keeps a replay from
training anything twice): a full disk stops publishing too, loudly, when the
next version cannot be written. A write cut short may leave a torn last line:
the file is abandoned (the retry goes to a new file) and the export skips a
torn final line. Pending lines are capped (`max_pending`); beyond that
`ArchiveError` stops the trainer rather than grow without bound (the pairs
are uncommitted, so they are replayed after the restart).

Metrics: `odpo_trainer_pairs_archived_total` (lines made durable),
`odpo_trainer_archive_errors_total`, `odpo_trainer_archive_pending_pairs`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from core.contracts import PreferencePair
from trainer import metrics as M

log = logging.getLogger(__name__)

ARCHIVE_DIR = "pairs"
PREFIX, SUFFIX = "pairs-", ".jsonl"


class ArchiveError(RuntimeError):
    """The archive has been failing for so long that the trainer must stop (nothing is committed)."""


def archive_files(store: Path) -> list[Path]:
    """The archive's files in the order they were written (their names sort by time)."""
    folder = Path(store) / ARCHIVE_DIR
    return sorted(folder.glob(f"{PREFIX}*{SUFFIX}")) if folder.is_dir() else []


class PairArchive:
    """Append-only, rotated JSONL files of the pairs this process read."""

    def __init__(self, store: Path, rotate_bytes: int = 64 << 20, max_pending: int = 100_000,
                 retry_s: float = 5.0):
        self.folder = Path(store) / ARCHIVE_DIR
        self.rotate_bytes, self.max_pending = max(1, int(rotate_bytes)), max_pending
        self.retry_s = retry_s  # while failing, a sync tries the disk again at most this often
        self._failed_at = 0.0
        self._seen: set[str] = set()
        self._pending: list[bytes] = []
        self._file = None
        self._path: Path | None = None
        self._index = 0
        self._size = 0
        self.failing = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def path(self) -> Path | None:
        """The file being appended to (None before the first write or after a failure)."""
        return self._path

    def add(self, pair: PreferencePair) -> bool:
        """Queue `pair` for the archive unless this process already has it; True when queued."""
        if pair.id in self._seen:
            return False
        if len(self._pending) >= self.max_pending:
            raise ArchiveError(f"{len(self._pending)} pairs wait for the archive in {self.folder} and it keeps "
                               "failing; stopping (they are uncommitted and will be replayed)")
        self._seen.add(pair.id)
        self._pending.append(pair.to_bytes() + b"\n")
        M.ARCHIVE_PENDING.set(len(self._pending))
        return True

    def sync(self) -> bool:
        """Write, flush and fsync what is pending; False (logged, counted, kept pending) when the disk fails."""
        if not self._pending:
            return True
        if self.failing and time.monotonic() - self._failed_at < self.retry_s:
            return False
        try:
            self._write_pending()
        except OSError as exc:
            self._failed_at = time.monotonic()
            M.ARCHIVE_ERRORS.inc()
            log.error("pair archive: cannot write %d pairs to %s (%s); offsets stay uncommitted until it "
                      "works again", len(self._pending), self._path or self.folder, exc)
            self._abandon()
            self.failing = True
            return False
        if self.failing:
            log.warning("pair archive: writing again (%s)", self._path)
            self.failing = False
        return True

    def _write_pending(self) -> None:
        while self._pending:
            if self._file is None or (self._size and self._size + len(self._pending[0]) > self.rotate_bytes):
                self._open_next()  # a file holds at least one line, and never grows past the size after it
            batch, size = [], 0
            for line in self._pending:  # fill the file up to its rotation size (at least one line)
                if batch and self._size + size + len(line) > self.rotate_bytes:
                    break
                batch.append(line)
                size += len(line)
            self._file.write(b"".join(batch))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._size += size
            del self._pending[: len(batch)]
            M.PAIRS_ARCHIVED.inc(len(batch))
            M.ARCHIVE_PENDING.set(len(self._pending))

    def _open_next(self) -> None:
        self._abandon()
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        while True:  # a fresh file, never one another archive (or an earlier failure) left
            self._index += 1
            path = self.folder / f"{PREFIX}{stamp}-{os.getpid()}-{self._index:04d}{SUFFIX}"
            try:
                self._file = open(path, "xb")  # noqa: SIM115 -- held open across syncs
                break
            except FileExistsError:
                continue
        self._path, self._size = path, 0
        fd = os.open(self.folder, os.O_RDONLY)  # the new name itself must survive a crash
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _abandon(self) -> None:
        """Close the current file; the next write opens a new one (after a failure it may end torn)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file, self._path, self._size = None, None, 0

    def close(self) -> None:
        self.sync()
        self._abandon()
