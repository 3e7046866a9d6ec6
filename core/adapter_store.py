"""The adapter store: a directory of `policy-v<N>/` folders, shared by trainer, generator and gateway.

A version is written to a temporary folder beside its final place and renamed
into place only when complete, so a reader never sees half an adapter. Its
sha256 covers every file name and byte, and travels in `AdapterReady`.

The store, not the `odpo.adapters` topic, is the record of which versions
exist (a topic can lose old messages). Beside the folders it holds:
- `announced/policy-v<N>.json`: the `AdapterReady` of each version, written by
  the trainer after the rename and before the Kafka message; `newest_ready`
  is how a component that may be behind learns the newest version;
- `trainer-published`: the newest version whose Kafka message went out;
- `holds/<owner>.json`: versions a component still needs (the gate's
  promoted, pinned and rollback versions); retention never deletes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from prometheus_client import Counter

from core.contracts import AdapterReady, version_name

_VERSION_DIR = re.compile(r"^policy-v([1-9][0-9]*)$")
ANNOUNCED_DIR = "announced"
PUBLISHED_FILE = "trainer-published"
HOLDS_DIR = "holds"

UNANNOUNCED = Counter("odpo_bus_unannounced_adapters_total",
                      "AdapterReady messages refused (dead-lettered) because the store's announced/ record of their "
                      "version is missing or differs, or they name another folder than policy-v<N>, by component.",
                      ["component"])


def version_path(store: Path, version: int) -> Path:
    return Path(store) / version_name(version)


def adapter_digest(folder: Path) -> str:
    """sha256 over the sorted relative names and contents of every file in `folder`."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no files")
    for p in files:
        rel = p.relative_to(folder).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel)
        h.update(p.stat().st_size.to_bytes(8, "big"))
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def staging_dir(store: Path, version: int) -> Path:
    """A fresh temporary folder in the store, to be passed to `publish_dir`."""
    Path(store).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{version_name(version)}.tmp-", dir=store))


def publish_dir(staged: Path, store: Path, version: int) -> Path:
    """fsync the staged files and rename the folder into place atomically; returns the final path."""
    final = version_path(store, version)
    for p in Path(staged).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():  # a previous run crashed after the rename but before publishing: replace it
        shutil.rmtree(final)
    os.rename(staged, final)
    dir_fd = os.open(store, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


class AdapterFolderError(Exception):
    """An adapter folder that must not be served: outside the store, unreadable, or not the announced bytes."""


def verified_folder(store: Path, rel_path: str, sha256: str) -> Path:
    """`rel_path` in the store, resolved, if it lies inside the store and its files' digest is `sha256`;
    raises AdapterFolderError saying why not."""
    root = Path(store).expanduser().resolve()
    folder = (root / rel_path).resolve()
    if not folder.is_relative_to(root):
        raise AdapterFolderError(f"{rel_path} is outside the adapter store")
    try:
        digest = adapter_digest(folder)
    except OSError as exc:
        raise AdapterFolderError(f"cannot read {folder}: {exc}") from exc
    if digest != sha256:
        raise AdapterFolderError(f"sha256 mismatch for {folder}")
    return folder


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once: write a uniquely named temporary file beside it, fsync, rename.
    (Not `.tmp-<pid>` alone: pods sharing the store all run as pid 1.)"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; left only by a failed write


def published_versions(store: Path) -> list[int]:
    """Versions present in the store, ascending."""
    store = Path(store)
    if not store.is_dir():
        return []
    found = (_VERSION_DIR.match(p.name) for p in store.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def write_manifest(store: Path, ready: AdapterReady) -> Path:
    """Record `ready` in the store (atomically): from now on `newest_ready` finds this version."""
    path = Path(store) / ANNOUNCED_DIR / f"{version_name(ready.version)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, ready.to_bytes())
    return path


def read_manifest(store: Path, version: int) -> AdapterReady | None:
    """The recorded `AdapterReady` of `version`, or None when it has none (or its folder is gone)."""
    store = Path(store)
    try:
        ready = AdapterReady.from_bytes((store / ANNOUNCED_DIR / f"{version_name(version)}.json").read_bytes())
    except (OSError, ValueError):
        return None
    return ready if ready.version == version and (store / ready.path).is_dir() else None


def announced_versions(store: Path) -> list[int]:
    """Versions with a manifest whose folder is in the store, ascending."""
    folder = Path(store) / ANNOUNCED_DIR
    if not folder.is_dir():
        return []
    names = (p.name[: -len(".json")] for p in folder.glob("policy-v*.json"))
    found = (_VERSION_DIR.match(n) for n in names)
    store_versions = set(published_versions(store))
    return sorted(v for v in (int(m.group(1)) for m in found if m) if v in store_versions)


class NotAnnounced(Exception):
    """An `AdapterReady` from the topic that the store does not back: `reason` says why. `stale` is True for a
    version retention already deleted (older than the store's newest announced one, its record and folder gone):
    an old message on the compacted topic, to skip, not a forgery to dead-letter."""

    def __init__(self, reason: str, stale: bool = False):
        super().__init__(reason)
        self.reason, self.stale = reason, stale


def check_announced(store: Path, ready: AdapterReady, component: str) -> AdapterReady:
    """`ready` (read from odpo.adapters) if the store's `announced/` record of its version is that very message
    and it names that version's folder; raises NotAnnounced otherwise.

    The trainer writes the record before the Kafka message (`write_manifest`), so a real message always finds
    it. The message's own sha256 proves nothing: anyone who can write the topic can replay version 3's digest
    and path as version 2^31, which would become the newest version and make every real one after it look old.
    Every reader of the topic (the generator's watcher, the gate) takes a message only through this check;
    a refusal that is not `stale` is counted for `component`.
    """
    try:
        return _check_announced(Path(store), ready)
    except NotAnnounced as exc:
        if not exc.stale:
            UNANNOUNCED.labels(component).inc()
        raise


def _check_announced(store: Path, ready: AdapterReady) -> AdapterReady:
    expected = version_name(ready.version)
    if ready.path != expected:
        raise NotAnnounced(f"{expected} names the folder {ready.path!r}, not {expected!r}")
    record = read_manifest(store, ready.version)
    if record is None:
        newest = max(announced_versions(store), default=0)
        stale = ready.version < newest and not version_path(store, ready.version).exists()
        raise NotAnnounced(f"the adapter store has no announced record of {expected}", stale=stale)
    if record.model_dump(exclude={"created_at"}) != ready.model_dump(exclude={"created_at"}):
        differ = sorted(k for k, v in record.model_dump().items() if getattr(ready, k) != v and k != "created_at")
        raise NotAnnounced(f"{expected} differs from the store's announced record in {', '.join(differ)}")
    return ready


def newest_ready(store: Path) -> AdapterReady | None:
    """The `AdapterReady` of the newest complete, announced version in the store (None: only base)."""
    for version in reversed(announced_versions(store)):
        ready = read_manifest(store, version)
        if ready is not None:
            return ready
    return None


def published_version(store: Path) -> int:
    """The newest version whose AdapterReady went out on Kafka (0 when none did)."""
    try:
        return int((Path(store) / PUBLISHED_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def mark_published(store: Path, version: int) -> None:
    """Record that `version`'s AdapterReady is flushed (write-to-temp, then atomic replace)."""
    write_file_atomic(Path(store) / PUBLISHED_FILE, f"{version}\n".encode())


def hold_versions(store: Path, owner: str, versions: set[int] | list[int]) -> None:
    """Say which versions `owner` still needs; retention keeps every version some owner holds."""
    path = Path(store) / HOLDS_DIR / f"{owner}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, json.dumps(sorted({int(v) for v in versions})).encode())


def held_versions(store: Path) -> set[int]:
    """Every version some owner holds (an unreadable hold file is skipped)."""
    folder = Path(store) / HOLDS_DIR
    held: set[int] = set()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            held.update(int(v) for v in json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
    return held
