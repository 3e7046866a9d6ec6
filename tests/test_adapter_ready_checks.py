"""A forged AdapterReady is dead-lettered by every reader of odpo.adapters, and real later versions keep working.

Forgeries: version 3's digest and folder replayed as version 2^31 (it would become the newest version and make
every real one look old), and a version that names another version's folder. Real broker (a module's own, so
no other module's adapters are on its odpo.adapters), real store files; the generator's vLLM is replaced by a
stand-in that verifies the folder's digest as AdapterManager does (vLLM itself is not what is tested).
"""

from __future__ import annotations

import threading
import time

from core.adapter_store import adapter_digest, verified_folder, write_manifest
from core.bus import Inbox, TopicTail, make_producer, publish
from core.contracts import TOPIC_ADAPTERS, TOPIC_DLQ, AdapterReady, DeadLetter, TrainMetrics, version_name
from core.settings import CommonSettings, GateSettings
from generator.watcher import AdapterWatcher
from service.gate.metrics import ScoreGauge
from service.gate.promotion import PromotionGate
from service.registry.book import VersionBook

HUGE = 2 ** 31


def stored(store, version: int, parent: int = 0) -> AdapterReady:
    """A version in the store as the trainer leaves it: its folder, then its announced record."""
    folder = store / version_name(version)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(bytes([version % 251]) * 64)
    ready = AdapterReady(version=version, path=folder.name, sha256=adapter_digest(folder), base_model="m",
                         parent_version=parent, pairs_trained=4,
                         metrics=TrainMetrics(loss=0.6, reward_margin=0.1, reward_accuracy=0.6, steps=1))
    write_manifest(store, ready)
    return ready


class Served:
    """The generator's AdapterManager with its vLLM taken out: verifies the folder's digest, then serves."""

    def __init__(self, store):
        self.store, self.current_version, self.served = store, 0, []

    def apply(self, ready: AdapterReady) -> bool:
        if ready.version <= self.current_version:
            return False
        verified_folder(self.store, ready.path, ready.sha256)  # raises for bytes the message does not name
        self.current_version = ready.version
        self.served.append(ready.version)
        return True

    def forget_deleted(self):
        return []


def forge(ready: AdapterReady, version: int, path: str | None = None) -> AdapterReady:
    return ready.model_copy(update={"version": version, "path": path or ready.path, "parent_version": 0})


def dead_letters(bootstrap: str, component: str, want: int, timeout_s: float = 30) -> list[DeadLetter]:
    tail = TopicTail(bootstrap, [TOPIC_DLQ], client_id="odpo-test-tail")
    found: list[DeadLetter] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < want and time.monotonic() < deadline:
            for rec in tail.poll(300):
                letter = DeadLetter.from_bytes(rec.value)
                if letter.component == component and letter.source_topic == TOPIC_ADAPTERS:
                    found.append(letter)
    finally:
        tail.close()
    return found


def _until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(0.1)


def test_forged_adapter_ready_is_dead_lettered_by_the_generator_and_the_gate(own_broker, tmp_path):
    bootstrap, store = own_broker.bootstrap, tmp_path / "store"
    producer = make_producer(bootstrap)
    v3, v4 = stored(store, 3), stored(store, 4, parent=3)
    forged_huge = forge(v3, HUGE)  # version 3's digest and folder, replayed far ahead
    forged_path = forge(v4, 6)  # version 6 naming version 4's folder (and digest)
    for ready in (v3, v4, forged_huge, forged_path):
        publish(producer, TOPIC_ADAPTERS, version_name(ready.version), ready)
    # A forged message under its "own" folder name, whose record the store does not have either.
    producer.send(TOPIC_ADAPTERS, key=b"policy-v7", value=forge(v4, 7, "policy-v7").to_bytes())
    producer.flush()

    # -- the generator's watcher ---------------------------------------------------------------------------
    halt = threading.Event()
    inbox = Inbox(bootstrap, TOPIC_ADAPTERS, AdapterReady, "generator", producer, group_id=None)
    served = Served(store)
    watcher = AdapterWatcher(inbox, served, store, store_check_s=0.5)
    runner = None
    try:
        assert watcher.catch_up(halt) == 4 and served.current_version == 4
        runner = threading.Thread(target=watcher.run, args=(halt,), daemon=True)
        runner.start()
        v5 = stored(store, 5, parent=4)  # a real later version: record first, then the message
        publish(producer, TOPIC_ADAPTERS, version_name(5), v5)
        _until(lambda: served.current_version == 5, 30, "the generator serving the real v5")
    finally:
        halt.set()
        if runner is not None:
            runner.join(timeout=10)
        inbox.close()
    assert HUGE not in served.served and 6 not in served.served and 7 not in served.served
    letters = dead_letters(bootstrap, "generator", 3)
    assert {d.key for d in letters} >= {version_name(HUGE), "policy-v6", "policy-v7"}
    assert all("not announced in the adapter store" in d.error for d in letters)
    assert any("names the folder 'policy-v4'" in d.error for d in letters if d.key == "policy-v6")

    # -- the gate's reader (topic and store catch-up) ------------------------------------------------------
    common = CommonSettings(bootstrap_servers=bootstrap, store_dir=store)
    book = VersionBook(0.0)
    gate = PromotionGate(book, None, GateSettings(store_check_s=0.5), bootstrap, ScoreGauge(4), common=common)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not {3, 4, 5} <= {r["version"] for r in book.export_state()["records"]}:
            gate._read_adapters()
        for _ in range(10):  # read the rest of the topic (the forgeries come after the real v3 and v4)
            gate._read_adapters()
        v8 = stored(store, 8, parent=5)
        publish(producer, TOPIC_ADAPTERS, version_name(8), v8)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and book.record(8) is None:
            gate._read_adapters()
        known = {r["version"] for r in book.export_state()["records"]}
    finally:
        gate.stop() if gate._thread.is_alive() else None
        for close in (gate._inbox and gate._inbox.close, gate._producer and gate._producer.close):
            if close:
                close()
        producer.close()
    assert {3, 4, 5, 8} <= known, known
    assert not known & {HUGE, 6, 7}, known
    letters = dead_letters(bootstrap, "gate", 3)
    assert {d.key for d in letters} >= {version_name(HUGE), "policy-v6", "policy-v7"}
