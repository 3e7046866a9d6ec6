"""The adapter store: a directory of `policy-v<N>/` folders, shared by trainer and generator.

A version is written to a temporary folder beside its final place and renamed
into place only when complete, so a reader never sees half an adapter. Its
sha256 covers every file name and byte, and travels in `AdapterReady`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from service.contracts import version_name

_VERSION_DIR = re.compile(r"^policy-v([1-9][0-9]*)$")


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


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once: write `.<name>.tmp-<pid>` beside it, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def published_versions(store: Path) -> list[int]:
    """Versions present in the store, ascending."""
    store = Path(store)
    if not store.is_dir():
        return []
    found = (_VERSION_DIR.match(p.name) for p in store.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)
