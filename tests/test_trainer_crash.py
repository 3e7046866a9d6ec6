"""`odpo trainer` killed with SIGKILL again and again on the real broker: no pair is lost or trained twice.

A few hundred pairs go to odpo.preferences; the trainer process (a tiny local
Llama, so a window takes milliseconds) is killed at random moments right
around its checkpoint/publish/commit, several times, and restarted each time.
At the end the trained ledger (trainer/ledger.py) proves every produced pair
was trained exactly once along the lineage of versions, the versions are
consecutive (retention keeps the newest five, each one its parent's state plus
its own window), every one of them was announced on odpo.adapters (one stored
but unannounced at a kill is announced at restart) with the digest of its
folder where it is still stored, the pair archive holds every pair, and
nothing half-written is left in the store.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

from kafka import TopicPartition

from core.adapter_store import (
    adapter_digest,
    announced_versions,
    published_version,
    published_versions,
    version_path,
)
from core.bus import publish
from core.contracts import (
    TOPIC_ADAPTERS,
    TOPIC_PREFERENCES,
    AdapterReady,
    PreferencePair,
    PromptEvent,
    pair_id,
)
from tests.test_trainer_service import end_offset, read_from, start_group_at_end
from trainer.checkpoint import STATE_FILE
from trainer.export import archived_pairs
from trainer.ledger import trained_ledger

N_PAIRS, WINDOW, KILLS, KEEP = 256, 8, 6, 5


def random_pairs(n: int, tag: str, vocab: int = 49152) -> list[PreferencePair]:
    """Generator-style pairs with token ids (distinct ids, nothing to tokenize)."""
    rng = random.Random(tag)
    out = []
    for i in range(n):
        prompt = PromptEvent(id=f"crash-{tag}-{i}", text=f"prompt {i}", source="test")
        def ids(k: int) -> list[int]:
            return [rng.randrange(3, vocab) for _ in range(k)]

        chosen, rejected = ids(rng.randint(2, 10)) + [2], ids(rng.randint(2, 10)) + [2]
        out.append(PreferencePair(id=pair_id(prompt.id, f"c{i}", f"r{i}", 0), prompt=prompt, chosen=f"c{i}",
                                  rejected=f"r{i}", prompt_token_ids=ids(rng.randint(4, 16)), chosen_token_ids=chosen,
                                  rejected_token_ids=rejected, policy_version=0, judge="test"))
    return out


def state_of(store, version: int) -> dict:
    return json.loads((version_path(store, version) / STATE_FILE).read_text())


def newest(store) -> int:
    versions = published_versions(store)
    return versions[-1] if versions else 0


def start_trainer(env: dict, log_file) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "trainer"], env=env, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(cond, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)  # the moments aimed at last milliseconds (fsyncs, a flush)


def test_kill_9_at_random_points_trains_every_pair_exactly_once(broker, producer, group_id, tiny_model_dir,
                                                                  tmp_path):
    bootstrap, store = broker.bootstrap, tmp_path / "store"
    start_group_at_end(bootstrap, group_id)
    adapters_start = end_offset(bootstrap, TopicPartition(TOPIC_ADAPTERS, 0))
    pairs = random_pairs(N_PAIRS, uuid.uuid4().hex[:6])
    for p in pairs:
        publish(producer, TOPIC_PREFERENCES, p.prompt.id, p, flush=False)
    producer.flush()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODPO_")}
    env.update(ODPO_BOOTSTRAP_SERVERS=bootstrap, ODPO_STORE_DIR=str(store), ODPO_BASE_MODEL=str(tiny_model_dir),
               ODPO_LOG_LEVEL="INFO", ODPO_TRAINER_GROUP_ID=group_id, ODPO_TRAINER_WINDOW_PAIRS=str(WINDOW),
               ODPO_TRAINER_WINDOW_SECONDS="1", ODPO_TRAINER_STEPS_PER_WINDOW="2",
               ODPO_TRAINER_MAX_STALENESS="1000", ODPO_TRAINER_METRICS_PORT="0")
    rng = random.Random(1234)
    log_path = tmp_path / "trainer.log"
    kills = []
    with open(log_path, "wb") as log_file:
        for i in range(KILLS):  # run until a few more versions exist, then SIGKILL at one of three moments
            before = newest(store)
            proc = start_trainer(env, log_file)
            try:
                target = before + rng.randint(1, 3)
                wait_for(lambda t=target: newest(store) >= t, proc, 120, f"version {target}")
                moment = ("writing", "renamed", "random")[i % 3]
                if moment == "writing":  # while the next version is being written
                    wait_for(lambda: any(".tmp-" in p.name for p in store.iterdir()), proc, 60, "a staging folder")
                elif moment == "renamed":  # in place but not yet announced
                    wait_for(lambda t=target: newest(store) > max(published_version(store), t), proc, 60, "a rename")
                else:  # anywhere in the next window's training, rename, publish or commit
                    time.sleep(rng.uniform(0, 0.15))
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            leftover = any(".tmp-" in p.name for p in store.iterdir())
            kills.append((moment, before, newest(store), published_version(store), leftover))
        proc = start_trainer(env, log_file)  # the last run takes everything left, then stops cleanly
        try:
            all_ids = {p.id for p in pairs}
            wait_for(lambda: newest(store) > 0 and set(state_of(store, newest(store))["trained_ids"]) >= all_ids,
                     proc, 240, "every pair in the ledger")
            end_version = newest(store)
            wait_for(lambda: published_version(store) == end_version, proc, 30, "the last announcement")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    log_text = log_path.read_text()
    print(f"kills (moment, version at start, on disk, announced, half-written left): {kills}; announced at restart: "
          f"{log_text.count('its AdapterReady never went out')}; half-written versions removed: "
          f"{log_text.count('removed half-written')}")

    # the kills were real: a run died with a higher version on disk than it started from, every time, and
    # they hit the narrow moments: a version half-written, and one in place whose announcement never went out
    assert all(after > before for _, before, after, _, _ in kills), kills
    assert any(leftover for *_, leftover in kills), kills
    assert "its AdapterReady never went out" in log_text and "removed half-written" in log_text
    assert log_text.count("resumed at version") >= KILLS

    versions, end = published_versions(store), newest(store)
    assert versions == list(range(end - KEEP + 1, end + 1)) == announced_versions(store)  # the newest KEEP
    ledger = trained_ledger(store)
    assert sorted(ledger) == list(range(1, end + 1))  # consecutive, nothing missing
    lineage = [i for v in sorted(ledger) for i in ledger[v]]
    assert len(lineage) == len(set(lineage)) == N_PAIRS  # trained exactly once ...
    assert set(lineage) == {p.id for p in pairs}  # ... every one of them
    prev_ids = lineage[: len(lineage) - sum(len(ledger[v]) for v in versions)]
    for v in versions:  # each stored version = its parent's ledger + exactly the pairs its own update trained
        st = state_of(store, v)
        assert st["version"] == v and st["parent_version"] == v - 1 and st["window_ids"] == ledger[v]
        assert st["trained_ids"] == prev_ids + st["window_ids"]
        prev_ids = st["trained_ids"]
    assert {p.id for p in archived_pairs(store)} == {p.id for p in pairs}  # the archive lost none

    announced = [AdapterReady.from_bytes(r.value) for r in read_from(
        bootstrap, TOPIC_ADAPTERS, adapters_start,
        lambda rs: {AdapterReady.from_bytes(r.value).version for r in rs} >= set(ledger), timeout_s=30)]
    assert {a.version for a in announced} == set(ledger)
    for a in announced:  # a version announced twice (killed after the flush, before the note) says the same
        assert a.path == f"policy-v{a.version}"
        if a.version in versions:
            assert a.sha256 == adapter_digest(store / a.path)
    assert published_version(store) == end
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]  # no half-written leftovers
