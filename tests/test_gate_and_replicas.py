"""One gate, two gateway replicas: the gate decides, every gateway serves its newest decision.

The gate (`odpo gate`) is the one writer of the policy registry on the
control topic; gateway replicas only read it. First, without vLLM, in this
process: a second gate fences the first (the newer claim wins, the older
stops deciding and its late writes are ignored), the state comes back after a
broker restart, and a record a forger or a bug made unreadable is skipped.
Then real processes, as deployed: one `odpo gate` under a supervisor (the
Launcher `odpo up` uses) and two `odpo gateway`s on the module's own Tansu
broker and the session's vLLM: an admin change through the gate is served by
both gateways within a second (p50 and max over 10 changes are printed), and
a kill -9 of the gate while it scores a version: it is restarted, the version
is decided exactly once, and clients of both gateways see no error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from core.broker import EmbeddedBroker, free_port
from core.bus import TopicTail, make_producer, publish
from core.adapter_store import write_manifest
from core.contracts import TOPIC_ADAPTERS, version_name
from core.runtime import die_with_parent
from service.gate.control import GateControl
from service.gate.metrics import ScoreGauge
from service.launcher import Launcher, RestartPolicy
from service.registry.book import VersionBook
from service.registry.follower import RegistryFollower
from tests.gateway_server import noisy_adapter, register_base
from tests.test_gateway_book import ready

TOKEN = "replicas-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
V1, V2, V3 = 9911, 9912, 9913  # names no other test of the session uses (and above theirs: the store's newest)
PROBE = [{"role": "user", "content": "Name one thing a river does."}]
# Small and open: scoring is fast and every sound version passes (the verdict has its own tests).
GATE = {"HELDOUT_PROMPTS": 3, "HELDOUT_PROMPTS_MAX": 3, "EVAL_MAX_TOKENS": 8, "PROMOTION_TOLERANCE": 1.0,
        "REFERENCE_LOGPROB": "false", "LOAD_WAIT_S": 0, "LIMIT_MEAN_WORDS": 1, "LIMIT_EMPTY_SHARE": 1,
        "LIMIT_DISTINCT2": 1, "LIMIT_ON_TOPIC_SHARE": 1, "LIMIT_REF_LOGPROB": 100, "LIMIT_GUARD_PASS": 1,
        "STORE_CHECK_S": 2}


# -- in this process -------------------------------------------------------------------------------------------
def _gate(broker, topic: str) -> GateControl:
    return GateControl(VersionBook(0.05), broker.bootstrap, topic, ScoreGauge(4), {"heldout_prompts": 3}).attach().start()


def _reader(broker, topic: str) -> RegistryFollower:
    return RegistryFollower(VersionBook(0.0), broker.bootstrap, topic, f"test-{uuid.uuid4().hex[:4]}").start()


def _until(predicate, timeout_s: float = 20, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f}s"
        time.sleep(0.02)
    return value


def test_a_second_gate_fences_the_first(broker):
    """A second gate started by mistake claims a newer epoch: the first stops deciding for good, its late writes
    (its old epoch) are ignored by every reader, the newer gate writes the keys again after them, and a reader
    that starts later agrees."""
    topic = f"odpo.control.test-{uuid.uuid4().hex[:8]}"
    a, r = _gate(broker, topic), _reader(broker, topic)
    b = c = None
    try:
        _until(lambda: a.term, what="a writes")
        a.book.add(ready(1))
        a.book.promote(1)
        _until(lambda: r.book.promoted == 1 and r.applied_seq == a.published_seq(), what="the reader applies a's change")
        assert r.view()["writer"] == a.writer_id and r.view()["epoch"] == 1

        b = _gate(broker, topic)
        _until(lambda: b.term == 2, what="b writes in epoch 2")
        _until(lambda: a.role == "fenced" and not a.term, what="a sees b's claim and stops deciding")
        b.book.add(ready(2))
        b.book.promote(2)
        # a's late writes (its old epoch): a record and a head that promote v1 again.
        late = make_producer(broker.bootstrap)
        record = {"schema_version": 1, "epoch": 1, "writer": a.writer_id, "digest": "late",
                  "record": {**a.book.export_state()["records"][1], "status": "refused", "reason": "late"}}
        head = {"schema_version": 1, "epoch": 1, "writer": a.writer_id, "url": "", "seq": 999, "promoted": 1,
                "history": [0, 1], "pinned": True, "evaluation": {}, "versions": {"0": "x", "1": "late"}}
        late.send(topic, key=b"version-1", value=json.dumps(record).encode())
        late.send(topic, key=b"head", value=json.dumps(head).encode())
        # ... and a record nobody can read (an epoch beyond any number): skipped, never a read loop
        late.send(topic, key=b"claim", value=b'{"schema_version": 1, "epoch": 1e999, "writer": "x"}')
        late.flush()
        late.close()
        time.sleep(2)
        for book in (a.book, b.book, r.book):
            assert (book.promoted, book.pinned) == (2, False)
            assert book.record(1).status != "refused"
        assert b.term == 2 and a.role == "fenced"
        # b wrote both keys again after the late writes, so compaction (newest message per key) keeps b's.
        newest = _until(lambda: (last := _newest_by_key(broker, topic))["head"]["writer"] == b.writer_id and last,
                        10, "b's head written again after the late one")
        assert newest["version-1"]["writer"] == b.writer_id
        c = _reader(broker, topic)
        _until(lambda: c.book.promoted == 2 and c.applied_seq >= b.published_seq(), what="c applies b's state")
        assert c.book.record(1).status == b.book.record(1).status and not c.book.pinned
    finally:
        for x in (a, b, c, r):
            if x is not None:
                x.stop()


def test_a_restarted_broker_gets_the_state_back_from_the_gate(tmp_path):
    """The memory-only broker restarts empty: the gate reads the new topic, claims again and publishes its whole
    state, which a reader started afterwards takes; a reader from before follows later changes."""
    with EmbeddedBroker() as broker:
        topic = "odpo.control"
        a, r = _gate(broker, topic), _reader(broker, topic)
        try:
            _until(lambda: a.term, what="a writes")
            for v in (1, 2):
                a.book.add(ready(v))
            a.book.promote(2)
            a.book.pin()
            _until(lambda: r.applied_seq == a.published_seq(), what="the reader applies a's state")
            broker.stop()
            broker.start()
            _until(lambda: a.term == 2, 60, "a claiming again on the new topic")
            c = _reader(broker, topic)
            try:
                _until(lambda: (c.book.promoted, c.book.pinned) == (2, True), 30, "c taking the republished state")
                assert [c.book.record(v).status for v in (1, 2)] == ["pending", "pending"]
                a.book.unpin()
                for reader in (r, c):
                    _until(lambda reader=reader: not reader.book.pinned, 20, "a reader applying a later change")
            finally:
                c.stop()
        finally:
            a.stop()
            r.stop()


def test_a_replayed_head_of_the_gate_changes_nothing(broker):
    """Anyone who can write the topic can copy a real (signed) head of the gate and write it again later: within
    the gate's epoch a head with an older seq is a replay, so readers keep the newer state, and the gate writes
    its head again after the copy, so compaction (the newest message per key) keeps the gate's."""
    topic = f"odpo.control.test-{uuid.uuid4().hex[:8]}"
    a, r = _gate(broker, topic), _reader(broker, topic)
    try:
        _until(lambda: a.term, what="a writes")
        a.book.add(ready(1))
        a.book.promote(1)
        _until(lambda: r.book.promoted == 1 and r.applied_seq == a.published_seq(), what="the reader applies v1")
        old = next(rec for rec in reversed(_records(broker, topic)) if rec.key == b"head")
        assert json.loads(old.value)["promoted"] == 1
        a.book.add(ready(2))
        a.book.promote(2)
        _until(lambda: r.book.promoted == 2 and r.applied_seq == a.published_seq(), what="the reader applies v2")
        replay = make_producer(broker.bootstrap)
        replay.send(topic, key=old.key, value=old.value, headers=list(old.headers or []))
        replay.flush()
        replay.close()
        newest = _until(lambda: (last := _newest_by_key(broker, topic))["head"]["promoted"] == 2 and last, 10,
                        "the gate's head written again after the replay")
        assert newest["head"]["seq"] > json.loads(old.value)["seq"]
        time.sleep(1)
        assert (r.book.promoted, a.book.promoted, a.term) == (2, 2, 1)
        c = _reader(broker, topic)  # a reader that starts now reads the replay too, and the head after it
        try:
            _until(lambda: c.book.promoted == 2 and c.applied_seq >= a.published_seq(), what="c takes v2")
        finally:
            c.stop()
    finally:
        a.stop()
        r.stop()


def _records(broker, topic: str) -> list:
    tail = TopicTail(broker.bootstrap, [topic], client_id="odpo-test-control")
    try:
        found, idle = [], 0
        while idle < 3:
            records = tail.poll(300)
            idle = 0 if records else idle + 1
            found += records
        return found
    finally:
        tail.close()


def _newest_by_key(broker, topic: str) -> dict[str, dict]:
    tail = TopicTail(broker.bootstrap, [topic], client_id="odpo-test-control")
    try:
        newest, idle = {}, 0
        while idle < 3:
            records = tail.poll(300)
            idle = 0 if records else idle + 1
            newest.update({r.key.decode(): json.loads(r.value) for r in records if r.value is not None})
        return newest
    finally:
        tail.close()


# -- one gate and two gateway processes ------------------------------------------------------------------------
class Gateway:
    def __init__(self, name: str, env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "gateway"], env={**env, "ODPO_GATEWAY_PORT": str(self.port)},
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent)  # noqa: PLW1509 - the children die with the test process

    def policy(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).json().get("policy_version")
        except httpx.HTTPError:
            return None

    def served(self) -> str:
        """The version that answers a real chat completion for `policy` here."""
        resp = httpx.post(f"{self.url}/v1/chat/completions", timeout=120, json={
            "model": "policy", "messages": PROBE, "max_tokens": 4, "temperature": 0})
        assert resp.status_code == 200, resp.text
        return resp.headers["x-odpo-policy-version"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Gate:
    """`odpo gate` under the Launcher `odpo up` supervises its components with (a thread restarts it)."""

    def __init__(self, env: dict[str, str], folder: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.launcher = Launcher(folder / "logs", {**env, "ODPO_GATE_PORT": str(self.port)},
                                 policy=RestartPolicy(backoff_initial_s=0.5))
        self.child = self.launcher.start("gate")
        self.restarted: list[str] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self._halt.wait(0.2):
            self.restarted += self.launcher.supervise()

    def get(self, path: str) -> dict:
        resp = httpx.get(f"{self.url}{path}", headers=AUTH, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def admin(self, action: str, body: dict | None = None) -> dict:
        resp = httpx.post(f"{self.url}/admin/{action}", json=body, headers=AUTH, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def record(self, version: int) -> dict | None:
        return next((v for v in self.get("/admin/versions")["versions"] if v["version"] == version), None)

    def decisions(self) -> list[str]:
        """Versions the gate decided (every process's lifetime), from its log, in order."""
        found = re.findall(r"gate: (?:promoted (\S+) \(|(\S+) not promoted|(\S+) \(promoted\) scores)",
                           self.child.log_path.read_text(errors="replace"))
        return [next(x for x in groups if x) for groups in found]

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=5)
        self.launcher.stop()


@pytest.fixture(scope="module")
def house(vllm_server, model_dir, vllm_store, own_broker, tmp_path_factory):
    register_base(vllm_server.url, model_dir, vllm_store)
    folder = tmp_path_factory.mktemp("replicas")
    topic = f"odpo.control.{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "ODPO_BOOTSTRAP_SERVERS": own_broker.bootstrap, "ODPO_STORE_DIR": str(vllm_store),
           "ODPO_LOG_LEVEL": "INFO", "ODPO_GATEWAY_VLLM_URL": vllm_server.url, "ODPO_GATEWAY_CONTROL_TOPIC": topic}
    env.pop("ODPO_CONFIG", None)
    gate_env = {"ODPO_GATE_VLLM_URL": vllm_server.url, "ODPO_GATE_CONTROL_TOPIC": topic,
                "ODPO_GATE_ADMIN_TOKEN": TOKEN, "ODPO_GATE_REGISTRY_FILE": str(folder / "registry.json"),
                **{f"ODPO_GATE_{k}": str(v) for k, v in GATE.items()}}
    producer = make_producer(own_broker.bootstrap)
    announced = []  # the trainer's order: folder, announcement, then the topic (a gate takes only announced ones)

    def publish_version(ready):
        announced.append(write_manifest(vllm_store, ready))
        publish(producer, TOPIC_ADAPTERS, version_name(ready.version), ready)

    publish_version(noisy_adapter(vllm_store, model_dir, V1, 1e-5, seed=21))
    gate = Gate({**env, **gate_env}, folder)
    gateways = [Gateway(name, env, folder / f"gateway-{name}.log") for name in ("a", "b")]
    try:
        _until(gate.ready, 120, "the gate writing the registry")
        for g in gateways:
            _until(lambda g=g: g.policy() is not None, 120, f"gateway {g.name} ready")
        yield gate, gateways, publish_version
    finally:
        for path in announced:  # later tests' gates take the store's newest announced version
            path.unlink(missing_ok=True)
        producer.close()
        for g in gateways:
            g.stop()
        gate.stop()


def _decided(gate: Gate, version: int, timeout_s: float = 120) -> dict:
    return _until(lambda: (rec := gate.record(version)) and rec["status"] not in ("pending", "evaluating") and rec,
                  timeout_s, f"{version_name(version)} decided")


def test_an_admin_change_through_the_gate_is_served_by_both_gateways_within_a_second(house):
    gate, gateways, _ = house
    rec = _decided(gate, V1)
    assert rec["status"] == "passed" and rec["promoted"], rec
    for g in gateways:
        _until(lambda g=g: g.policy() == V1, 10, f"gateway {g.name} serving {version_name(V1)}")
    lags = []
    for i in range(10):  # roll back to base, promote V1 again, ...
        view = gate.admin("rollback") if i % 2 == 0 else gate.admin("promote", {"version": V1})
        expected = view["promoted"]
        assert expected == (0 if i % 2 == 0 else V1)
        started = time.monotonic()
        for g in gateways:
            _until(lambda g=g: g.policy() == expected, 1.0, f"gateway {g.name} serving {version_name(expected)}")
        lags.append(time.monotonic() - started)
        assert {g.served() for g in gateways} == {str(expected)}
    seqs = {g.name: httpx.get(f"{g.url}/readyz", timeout=5).json()["registry"]["seq"] for g in gateways}
    assert set(seqs.values()) == {gate.get("/readyz")["control"]["seq"]}, seqs
    print(f"both gateways serving the gate's change after its admin call returned: p50 "
          f"{statistics.median(lags) * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms over {len(lags)} changes")
    assert max(lags) < 1.0
    metrics = httpx.get(f"{gate.url}/metrics").text
    assert "odpo_gate_writing 1.0" in metrics


def test_a_killed_gate_is_restarted_and_decides_the_pending_version_once(house, model_dir, vllm_store):
    gate, gateways, publish_version = house
    if gate.get("/admin/versions")["pinned"]:  # left by a test before that failed half-way
        gate.admin("unpin")
    # Clients on both gateways the whole time: not one error while the gate dies and comes back.
    answers, errors, halt = Counter(), [], threading.Event()

    def client(g: Gateway) -> None:
        while not halt.is_set():
            try:
                resp = httpx.post(f"{g.url}/v1/chat/completions", timeout=120, json={
                    "model": "policy", "messages": PROBE, "max_tokens": 2, "temperature": 0})
                if resp.status_code == 200:
                    answers[g.name] += 1
                else:
                    errors.append(f"{g.name}: {resp.status_code} {resp.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(f"{g.name}: {exc!r}")

    clients = [threading.Thread(target=client, args=(g,), daemon=True) for g in gateways]
    for t in clients:
        t.start()
    try:
        publish_version(noisy_adapter(vllm_store, model_dir, V2, 1e-5, seed=22, parent=V1))
        _until(lambda: (rec := gate.record(V2)) and rec["status"] == "evaluating", 60,
               f"the gate scoring {version_name(V2)}")
        old = gate.child.proc
        old.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        old.wait()
        _until(lambda: gate.child.proc is not old and gate.ready(), 120, "the gate restarted and writing again")
        back = time.monotonic() - killed_at
        rec = _decided(gate, V2)
        assert rec["status"] == "passed" and rec["promoted"], rec
        for g in gateways:
            _until(lambda g=g: g.policy() == V2, 5, f"gateway {g.name} serving {version_name(V2)}")
        publish_version(noisy_adapter(vllm_store, model_dir, V3, 1e-5, seed=23, parent=V2))
        assert _decided(gate, V3)["promoted"]
        _until(lambda: version_name(V3) in gate.decisions(), 10, "the decision in the log")  # logged just after
        time.sleep(1)  # (a second decision, if there were one, would be logged by now)
    finally:
        halt.set()
        for t in clients:
            t.join(timeout=130)
    decided = Counter(gate.decisions())
    print(f"gate kill -9 -> restarted and writing again in {back:.1f}s ({gate.restarted}); decisions: "
          f"{dict(decided)}; client answers {dict(answers)}, errors {len(errors)}")
    assert decided == Counter({"base": 1, version_name(V1): 1, version_name(V2): 1, version_name(V3): 1}), decided
    assert not errors, errors[:5]
    assert min(answers.values()) > 0 and len(answers) == 2
