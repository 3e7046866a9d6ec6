"""The store over many versions: retention keeps it bounded, held versions survive, the optimizer state lives
beside the versions (newest only) and a resume restores it; the archive holds every pair once; the trained
ledger names each version's pairs, none twice."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import torch

from core.adapter_store import (
    announced_versions,
    hold_versions,
    newest_ready,
    published_versions,
    version_path,
)
from core.bus import Inbox, publish
from core.contracts import TOPIC_PREFERENCES, PreferencePair
from core.settings import CommonSettings, TrainerSettings
from tests.test_trainer_crash import random_pairs
from tests.test_trainer_service import metric, start_group_at_end
from trainer.archive import archive_files
from trainer.checkpoint import (
    OPTIMIZER_DIR,
    OPTIMIZER_FILE,
    STATE_FILE,
    optimizer_path,
    remove_staging_leftovers,
)
from trainer.ledger import append_trained, ledger_path, trained_ledger
from trainer.recipe import Trainer
from trainer.retention import store_usage, versions_to_delete
from trainer.service import TrainerLoop

K, VERSIONS, WINDOW, HELD = 5, 30, 2, (3, 10)


def _size(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _optimizer_tensors(opt) -> dict:
    return {(k, name): v.clone() for k, s in opt.state_dict()["state"].items() for name, v in s.items()}


def test_thirty_versions_keep_the_store_bounded_and_resume_from_the_newest(broker, producer, group_id,
                                                                           tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    start_group_at_end(broker.bootstrap, group_id)
    hold_versions(store, "gateway", HELD)  # as the gateway does for its promoted / rollback versions
    common = CommonSettings(bootstrap_servers=broker.bootstrap, store_dir=store, base_model=tiny_model_dir)
    settings = TrainerSettings(group_id=group_id, max_staleness=1000, window_pairs=WINDOW, steps_per_window=1,
                               keep_versions=K)
    trainer = Trainer.open(tiny_model_dir, settings, store)
    inbox = Inbox(broker.bootstrap, TOPIC_PREFERENCES, PreferencePair, "trainer", producer, group_id=group_id)
    loop = TrainerLoop(trainer, inbox, producer, common, settings, threading.Event())
    pairs = random_pairs(VERSIONS * WINDOW, uuid.uuid4().hex[:6])
    deleted_before, archived_before = metric("odpo_trainer_versions_deleted_total"), \
        metric("odpo_trainer_pairs_archived_total")
    t0 = time.monotonic()
    try:
        for p in pairs + pairs[:7]:  # the last seven are replays: archived once, trained once
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p, flush=False)
        producer.flush()
        deadline = time.monotonic() + 120
        while (trainer.version < VERSIONS or loop._uncommitted) and time.monotonic() < deadline:
            loop.tick(timeout_ms=200)
    finally:
        loop.archive.close()
        inbox.close()
    seconds = time.monotonic() - t0
    assert trainer.version == VERSIONS

    kept = sorted({*HELD, *range(VERSIONS - K + 1, VERSIONS + 1)})
    assert published_versions(store) == kept and announced_versions(store) == kept
    assert newest_ready(store).version == VERSIONS
    assert metric("odpo_trainer_versions_deleted_total") - deleted_before == VERSIONS - len(kept)
    assert sorted(p.name for p in (store / OPTIMIZER_DIR).iterdir()) == [f"policy-v{VERSIONS}.pt"]
    assert all(not (version_path(store, v) / OPTIMIZER_FILE).exists() for v in kept)
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]

    # the archive: every pair sent, once (the replays were not written again)
    lines = [json.loads(line) for f in archive_files(store) for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(p.id for p in pairs)
    assert PreferencePair.model_validate(lines[0]) in pairs
    assert metric("odpo_trainer_pairs_archived_total") - archived_before == len(pairs)

    # the ledger: all thirty versions (most folders are gone), each pair trained once
    ledger = trained_ledger(store)
    assert sorted(ledger) == list(range(1, VERSIONS + 1))
    lineage = [i for v in sorted(ledger) for i in ledger[v]]
    assert len(lineage) == len(set(lineage)) == len(pairs) and set(lineage) == {p.id for p in pairs}
    newest_state = json.loads((version_path(store, VERSIONS) / STATE_FILE).read_text())
    assert newest_state["trained_ids"] == lineage and ledger[VERSIONS] == newest_state["window_ids"]

    # the bound: K versions + the held ones, one optimizer state, the archive, the ledger, small files
    usage = store_usage(store)
    version_bytes = max(_size(version_path(store, v)) for v in kept)
    small = 64 * 1024  # manifests, holds, the published marker
    bound = (K + len(HELD)) * version_bytes + _size(store / OPTIMIZER_DIR) + usage["archive"] + usage["ledger"] + small
    unbounded = VERSIONS * (version_bytes + _size(store / OPTIMIZER_DIR))  # before: every version + its optimizer
    total = sum(usage.values())
    print(f"\n{VERSIONS} versions in {seconds:.1f}s; store {total} B <= bound {bound} B (without retention "
          f"~{unbounded} B); by part {usage}; one version {version_bytes} B; ledger "
          f"{usage['ledger'] / len(pairs) * 1000:.0f} B and trained_ids "
          f"{len(json.dumps(newest_state['trained_ids'], indent=1)) / len(pairs) * 1000:.0f} B per 1000 pairs")
    assert total <= bound and total < unbounded / 2

    # a resume from the newest version gets its weights and AdamW moments back, and carries on
    before = _optimizer_tensors(trainer.optimizer)
    resumed = Trainer.open(tiny_model_dir, settings, store)
    assert resumed.version == VERSIONS and resumed.already_trained(pairs[0].id)
    after = _optimizer_tensors(resumed.optimizer)
    assert before.keys() == after.keys() and len(after) > 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    more = [resumed.tokenize(p) for p in random_pairs(WINDOW, uuid.uuid4().hex[:6])]
    resumed.publish_version(store, [p.pair_id for p in more], resumed.train_window(more))
    assert sorted(p.name for p in (store / OPTIMIZER_DIR).iterdir()) == [f"policy-v{VERSIONS + 1}.pt"]


def test_a_store_from_before_keeps_resuming_from_the_optimizer_state_inside_its_folder(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    trainer = Trainer.open(tiny_model_dir, TrainerSettings(steps_per_window=2))
    pairs = [trainer.tokenize(p) for p in random_pairs(2, uuid.uuid4().hex[:6])]
    trainer.publish_version(store, [p.pair_id for p in pairs], trainer.train_window(pairs))
    os.rename(optimizer_path(store, 1), version_path(store, 1) / OPTIMIZER_FILE)  # the old layout
    resumed = Trainer.open(tiny_model_dir, TrainerSettings(steps_per_window=2), store)
    before, after = _optimizer_tensors(trainer.optimizer), _optimizer_tensors(resumed.optimizer)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_retention_keeps_the_newest_k_and_held_versions():
    assert versions_to_delete(list(range(1, 11)), 3, set()) == list(range(1, 8))
    assert versions_to_delete(list(range(1, 11)), 3, {2, 9, 42}) == [1, 3, 4, 5, 6, 7]
    assert versions_to_delete(list(range(1, 11)), 0, set()) == []  # 0 keeps all
    assert versions_to_delete([4], 1, set()) == [] and versions_to_delete([], 5, set()) == []


def test_leftovers_of_a_kill_are_removed_and_the_rest_is_not(tmp_path):
    store = tmp_path
    (store / ".policy-v3.tmp-delete-123").mkdir()  # a deletion cut short
    (store / ".policy-v4.tmp-abcd").mkdir()  # a version being written
    (store / OPTIMIZER_DIR).mkdir()
    (store / OPTIMIZER_DIR / ".policy-v4.pt.tmp-77").write_bytes(b"x")
    (store / OPTIMIZER_DIR / "policy-v3.pt").write_bytes(b"x")
    (store / "announced").mkdir()
    (store / "announced" / ".policy-v4.json.tmp-77").write_bytes(b"x")
    (store / "policy-v3").mkdir()
    assert remove_staging_leftovers(store) == 4
    assert sorted(p.name for p in store.rglob("*")) == ["announced", "policy-v3", "policy-v3.pt", OPTIMIZER_DIR]


def test_the_ledger_takes_the_last_line_of_a_version_and_ignores_one_never_renamed(tmp_path):
    store = tmp_path
    for v in (1, 2):
        version_path(store, v).mkdir()
    append_trained(store, 1, ["a", "b"])
    append_trained(store, 2, ["c"])  # killed before the rename: v2 is made again from replays ...
    append_trained(store, 2, ["c", "d"])  # ... and appended again
    append_trained(store, 3, ["e"])  # killed before the rename, never made again (yet)
    with open(ledger_path(store), "ab") as f:
        f.write(b'{"version": 4, "pair_')  # a torn append
    append_trained(store, 2, ["c", "d"])  # the next append ends the torn line first
    assert trained_ledger(store) == {1: ["a", "b"], 2: ["c", "d"]}
    assert trained_ledger(tmp_path / "nothing") == {}
