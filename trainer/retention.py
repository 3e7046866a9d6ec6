"""Store retention: the trainer (the store's only writer of versions) deletes versions nobody needs.

After each publish the store keeps
- the newest `keep_versions` versions (`ODPO_TRAINER_KEEP_VERSIONS`, default 5;
  0 keeps every version), the newest of all always;
- every version some component holds (`core.adapter_store.held_versions`:
  the gate holds its promoted, pinned and rollback-history versions);
and deletes every other version's folder and manifest (`announced/`). A
folder is first renamed to a hidden `.policy-v<N>.tmp-delete` name and then
removed, so a reader never sees half a version, and a trainer killed midway
leaves a staging leftover that `remove_staging_leftovers` clears at start. The
manifest goes first, so `newest_ready` never names a folder being deleted.

What retention never touches: the pair archive (`pairs/`), the trained ledger
(`ledger/`), the holds. The optimizer state is pruned when a version is saved
(trainer/checkpoint.py: only the newest version's is kept).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from core.adapter_store import (
    ANNOUNCED_DIR,
    held_versions,
    published_versions,
    version_path,
)
from core.contracts import version_name

log = logging.getLogger(__name__)


def versions_to_delete(versions: list[int], keep_versions: int, held: set[int]) -> list[int]:
    """Of the stored `versions`, those retention deletes (ascending)."""
    if keep_versions <= 0 or not versions:
        return []
    newest = set(sorted(versions)[-keep_versions:])
    return [v for v in sorted(versions) if v not in newest and v not in held]


def prune_store(store: Path, keep_versions: int) -> list[int]:
    """Delete the versions retention does not keep; returns them. An OSError is logged, not raised."""
    store = Path(store)
    doomed = versions_to_delete(published_versions(store), keep_versions, held_versions(store))
    deleted = []
    for version in doomed:
        try:
            delete_version(store, version)
        except OSError as exc:  # the next publish tries again; a stuck version costs disk, not correctness
            log.warning("retention could not delete %s: %s", version_name(version), exc)
            continue
        deleted.append(version)
    if deleted:
        log.info("retention deleted %s (keeping the newest %d and held ones)",
                 ", ".join(version_name(v) for v in deleted), keep_versions)
    return deleted


def delete_version(store: Path, version: int) -> None:
    """Remove one version's manifest, then its folder (renamed out of sight first)."""
    store = Path(store)
    (store / ANNOUNCED_DIR / f"{version_name(version)}.json").unlink(missing_ok=True)
    folder = version_path(store, version)
    if not folder.is_dir():
        return
    doomed = store / f".{folder.name}.tmp-delete-{os.getpid()}"
    os.rename(folder, doomed)
    shutil.rmtree(doomed)


def store_usage(store: Path) -> dict[str, int]:
    """Bytes of the store by part: versions, optimizer, archive, ledger, other (manifests, holds, markers)."""
    from trainer.archive import ARCHIVE_DIR
    from trainer.checkpoint import OPTIMIZER_DIR
    from trainer.ledger import LEDGER_DIR

    parts = {"versions": 0, "optimizer": 0, "archive": 0, "ledger": 0, "other": 0}
    names = {OPTIMIZER_DIR: "optimizer", ARCHIVE_DIR: "archive", LEDGER_DIR: "ledger"}
    store = Path(store)
    if not store.is_dir():
        return parts
    versions = {version_name(v) for v in published_versions(store)}
    for top in store.iterdir():
        part = "versions" if top.name in versions else names.get(top.name, "other")
        files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        for f in files:
            try:
                parts[part] += f.stat().st_size
            except OSError:  # deleted meanwhile
                continue
    return parts
