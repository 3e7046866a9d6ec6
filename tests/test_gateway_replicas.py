"""Two gateway replicas, one control plane: the same `policy` everywhere, one gate, fail-over on kill -9.

Two real `odpo gateway` processes share the module's own Tansu broker and the
session's vLLM. Only the elected leader scores versions; promote, pin, unpin
and rollback work through either replica (a follower forwards them to the
leader and answers once its own registry holds the result), and both then
serve the same version as `policy`. The leader is killed with SIGKILL while it
scores a version: the other replica takes over, scores that version (pending
again) and the next one published, and no version is decided twice.

The first test needs no vLLM: fencing of a paused ex-leader on the control
topic, with control planes in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from core.broker import EmbeddedBroker, free_port
from core.bus import TopicTail, make_producer, publish
from core.contracts import TOPIC_ADAPTERS, version_name
from service.gateway.book import VersionBook
from service.gateway.control import ControlPlane
from service.gateway.metrics import ScoreGauge
from core.runtime import die_with_parent
from core.settings import GatewaySettings
from tests.gateway_server import noisy_adapter, register_base
from tests.test_gateway_book import ready

TOKEN = "replicas-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
V1, V2, V3 = 9901, 9902, 9903  # names no other test of the session uses (and above theirs: the store's newest)
PROBE = [{"role": "user", "content": "Name one thing a river does."}]
# Small and open: scoring is fast and every sound version passes (the verdict has its own tests).
GATE = {"HELDOUT_PROMPTS": 3, "HELDOUT_PROMPTS_MAX": 3, "EVAL_MAX_TOKENS": 8, "PROMOTION_TOLERANCE": 1.0,
        "GATE_REFERENCE_LOGPROB": "false", "LOAD_WAIT_S": 0, "LIMIT_MEAN_WORDS": 1, "LIMIT_EMPTY_SHARE": 1,
        "LIMIT_DISTINCT2": 1, "LIMIT_ON_TOPIC_SHARE": 1, "LIMIT_REF_LOGPROB": 100, "LIMIT_GUARD_PASS": 1,
        "STORE_CHECK_S": 2}  # the leader's session timeout stays the default (10 s): fail-over as deployed


# -- fencing, in this process ----------------------------------------------------------------------------------
class _Elected:
    """Stands in for the Kafka election: the test says who owns the leader partition."""

    def __init__(self, elected: bool):
        self.elected = elected

    def in_rebalance(self, max_s: float) -> bool:
        return False

    def start(self):
        return self

    def stop(self, timeout_s: float = 5.0):
        pass


def _plane(broker, topic: str, elected: bool) -> ControlPlane:
    settings = GatewaySettings(control_topic=topic, port=free_port())
    plane = ControlPlane(VersionBook(0.05), settings, broker.bootstrap, ScoreGauge(4), {"heldout_prompts": 3})
    plane.election = _Elected(elected)
    plane._may_claim = elected  # as an election gain does
    return plane.attach().start()


def _until(predicate, timeout_s: float = 20, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f}s"
        time.sleep(0.02)
    return value


def test_a_paused_ex_leader_is_fenced(broker):
    """A leader that wakes up after another replica took over writes with its old epoch: every replica ignores
    it, the new leader writes the keys again after it, and a replica reading the topic later agrees."""
    topic = f"odpo.gateway.control.test-{uuid.uuid4().hex[:8]}"
    a, b = _plane(broker, topic, True), _plane(broker, topic, False)
    try:
        _until(lambda: a.leading, what="a leads")
        a.book.add(ready(1))
        a.book.promote(1)
        _until(lambda: b.book.promoted == 1 and b.applied_seq == a.published_seq(), what="b applies a's change")
        assert b.view()["leader_url"] == a.url and b.view()["epoch"] == 1

        # b takes over (a's session expired while it was paused; a does not know yet) ...
        b.election.elected, b._may_claim = True, True
        _until(lambda: b.leading, what="b leads")
        _until(lambda: not a.leading, what="a sees b's claim and steps down")
        b.book.add(ready(2))
        b.book.promote(2)
        # ... and a's late writes (its old epoch) come after: a record and a head that promote v1 again.
        late = make_producer(broker.bootstrap)
        record = {"schema_version": 1, "epoch": 1, "writer": a.replica, "digest": "late",
                  "record": {**a.book.export_state()["records"][1], "status": "refused", "reason": "late"}}
        head = {"schema_version": 1, "epoch": 1, "writer": a.replica, "url": a.url, "seq": 999, "promoted": 1,
                "history": [0, 1], "pinned": True, "evaluation": {}, "versions": {"0": "x", "1": "late"}}
        late.send(topic, key=b"version-1", value=json.dumps(record).encode())
        late.send(topic, key=b"head", value=json.dumps(head).encode())
        late.flush()
        late.close()
        time.sleep(2)
        for plane in (a, b):
            assert (plane.book.promoted, plane.book.pinned) == (2, False), plane.replica
            assert plane.book.record(1).status != "refused"
        # b wrote both keys again after the late writes, so compaction (newest message per key) keeps b's.
        newest = _until(lambda: (last := _newest_by_key(broker, topic))["head"]["writer"] == b.replica and last,
                        10, "b's head written again after the late one")
        assert newest["version-1"]["writer"] == b.replica and newest["claim"]["writer"] == b.replica
        # A replica that starts now reads the whole topic (the late writes included) and takes b's state.
        c = _plane(broker, topic, False)
        try:
            _until(lambda: c.book.promoted == 2 and c.applied_seq >= b.published_seq(), what="c applies b's state")
            assert c.book.record(1).status == b.book.record(1).status and not c.book.pinned
        finally:
            c.stop()
    finally:
        a.stop()
        b.stop()


def test_a_restarted_broker_gets_the_state_back_from_the_leader(tmp_path):
    """The memory-only broker restarts empty: every replica reads the new topic from its start, and the leader
    claims again and publishes the whole state, which a replica started afterwards takes."""
    with EmbeddedBroker() as broker:
        topic = "odpo.gateway.control"
        a, b = _plane(broker, topic, True), _plane(broker, topic, False)
        try:
            _until(lambda: a.leading, what="a leads")
            for v in (1, 2):
                a.book.add(ready(v))
            a.book.promote(2)
            a.book.pin()
            _until(lambda: b.applied_seq == a.published_seq(), what="b applies a's state")
            broker.stop()
            broker.start()
            _until(lambda: a.leading and a.epoch == 2, 60, "a claiming again on the new topic")
            c = _plane(broker, topic, False)
            try:
                _until(lambda: (c.book.promoted, c.book.pinned) == (2, True), 30, "c taking the republished state")
                assert [c.book.record(v).status for v in (1, 2)] == ["pending", "pending"]
                a.book.unpin()
                for plane in (b, c):
                    _until(lambda plane=plane: not plane.book.pinned, 10, f"{plane.replica} applying a later change")
            finally:
                c.stop()
        finally:
            a.stop()
            b.stop()


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


# -- two gateway processes -------------------------------------------------------------------------------------
class Replica:
    def __init__(self, name: str, env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "gateway"], env={**env, "ODPO_GATEWAY_PORT": str(self.port)},
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent)  # noqa: PLW1509 - the children die with the test process

    def get(self, path: str) -> dict:
        resp = httpx.get(f"{self.url}{path}", headers=AUTH, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def admin(self, action: str, body: dict | None = None) -> dict:
        resp = httpx.post(f"{self.url}/admin/{action}", json=body, headers=AUTH, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def leader(self) -> dict:
        return self.get("/admin/leader")

    def record(self, version: int) -> dict | None:
        return next((v for v in self.get("/admin/versions")["versions"] if v["version"] == version), None)

    def served(self) -> str:
        """The version that answers a real chat completion for `policy` here."""
        resp = httpx.post(f"{self.url}/v1/chat/completions", timeout=120, json={
            "model": "policy", "messages": PROBE, "max_tokens": 4, "temperature": 0})
        assert resp.status_code == 200, resp.text
        return resp.headers["x-odpo-policy-version"]

    def decisions(self) -> list[str]:
        """Versions this replica's gate decided, from its log, in order."""
        found = re.findall(r"gate: (?:promoted (\S+) \(|(\S+) not promoted|(\S+) \(promoted\) scores)",
                           self.log.read_text(errors="replace"))
        return [next(x for x in groups if x) for groups in found]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def replicas(vllm_server, model_dir, vllm_store, own_broker, tmp_path_factory):
    register_base(vllm_server.url, model_dir, vllm_store)
    folder = tmp_path_factory.mktemp("replicas")
    env = {**os.environ, "ODPO_BOOTSTRAP_SERVERS": own_broker.bootstrap, "ODPO_STORE_DIR": str(vllm_store),
           "ODPO_LOG_LEVEL": "INFO", "ODPO_GATEWAY_HOST": "127.0.0.1", "ODPO_GATEWAY_VLLM_URL": vllm_server.url,
           "ODPO_GATEWAY_ADMIN_TOKEN": TOKEN, **{f"ODPO_GATEWAY_{k}": str(v) for k, v in GATE.items()}}
    env.pop("ODPO_CONFIG", None)
    producer = make_producer(own_broker.bootstrap)
    publish(producer, TOPIC_ADAPTERS, version_name(V1), noisy_adapter(vllm_store, model_dir, V1, 1e-5, seed=21))
    started = []
    for name in ("a", "b"):  # each its own registry file: what they agree on comes through Kafka
        started.append(Replica(name, {**env, "ODPO_GATEWAY_REGISTRY_FILE": str(folder / f"registry-{name}.json")},
                               folder / f"gateway-{name}.log"))
    try:
        for r in started:
            _until(lambda r=r: _healthy(r), 60, f"gateway {r.name} answering")
        yield started, producer
    finally:
        producer.close()
        for r in started:
            r.stop()


def _healthy(r: Replica) -> bool:
    assert r.proc.poll() is None, f"gateway {r.name} exited: {r.log.read_text()[-3000:]}"
    try:
        return httpx.get(f"{r.url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _roles(replicas: list[Replica]) -> tuple[Replica, Replica]:
    """(leader, follower), once one leads and the other knows it."""
    def settled():
        views = [r.leader() for r in replicas]
        leading = [r for r, v in zip(replicas, views) if v["leading"]]
        if len(leading) == 1:
            other = next(r for r in replicas if r is not leading[0])
            if other.leader()["leader_url"] == leading[0].url:
                return leading[0], other
        return None

    return _until(settled, 60, "one leader that both replicas know")


def _decided(r: Replica, version: int, timeout_s: float = 120) -> dict:
    return _until(lambda: (rec := r.record(version)) and rec["status"] not in ("pending", "evaluating") and rec,
                  timeout_s, f"{version_name(version)} decided (seen on {r.name})")


def _same_policy(first: Replica, other: Replica, expected: int) -> float:
    """Seconds until `other` also says `expected` is promoted (after `first`'s admin call returned); both
    replicas then answer `policy` with that version."""
    started = time.monotonic()
    _until(lambda: other.get("/admin/versions")["promoted"] == expected, 1.0, f"{other.name} promoting {expected}")
    lag = time.monotonic() - started
    assert first.get("/admin/versions")["promoted"] == expected
    assert first.served() == other.served() == str(expected)
    return lag


def test_admin_changes_through_either_replica_reach_both(replicas):
    (a, b), _ = replicas
    leader, follower = _roles([a, b])
    rec = _decided(follower, V1)
    assert rec["status"] == "passed" and rec["promoted"], rec
    lags = {}
    # A follower forwards to the leader and answers once it holds the result itself.
    view = follower.admin("rollback")
    assert view["promoted"] == 0 and view["control"]["leading"] is False
    lags["rollback via follower"] = _same_policy(follower, leader, 0)
    view = leader.admin("promote", {"version": V1})
    assert view["promoted"] == V1 and view["control"]["leading"] is True
    lags["promote via leader"] = _same_policy(leader, follower, V1)
    assert follower.admin("pin", {"version": 0})["pinned"] is True
    lags["pin via follower"] = _same_policy(follower, leader, 0)
    assert leader.get("/admin/versions")["pinned"] is True
    assert follower.admin("rollback")["promoted"] == V1  # back to the version promoted before the pin's
    lags["rollback via follower (2)"] = _same_policy(follower, leader, V1)
    assert leader.admin("unpin")["pinned"] is False
    _until(lambda: follower.get("/admin/versions")["pinned"] is False, 1.0, "the follower unpinned")
    # Same registry on both (their own files, filled through Kafka), same sequence number.
    _until(lambda: leader.leader()["seq"] == follower.leader()["seq"], 2.0, "the same sequence number on both")
    views = [r.get("/admin/versions") for r in (leader, follower)]
    strip = [{**v, "versions": [{k: x for k, x in rec.items() if k != "loaded"} for rec in v["versions"]],
              "control": None} for v in views]
    assert strip[0] == strip[1]
    metrics = {r.name: httpx.get(f"{r.url}/metrics").text for r in (leader, follower)}
    assert "odpo_gateway_leader 1.0" in metrics[leader.name] and "odpo_gateway_leader 0.0" in metrics[follower.name]
    print("other replica serving the same policy after the admin call returned (ms): "
          + ", ".join(f"{k} {v * 1000:.0f}" for k, v in lags.items()))


def test_killed_leader_fails_over_and_no_version_is_decided_twice(replicas, model_dir, vllm_store):
    (a, b), producer = replicas
    leader, follower = _roles([a, b])
    if leader.get("/admin/versions")["pinned"]:  # left by a test before that failed half-way
        leader.admin("unpin")
    # The leader starts scoring V2; it is killed before it decides.
    publish(producer, TOPIC_ADAPTERS, version_name(V2), noisy_adapter(vllm_store, model_dir, V2, 1e-5, seed=22,
                                                                      parent=V1))
    _until(lambda: (rec := follower.record(V2)) and rec["status"] == "evaluating", 60,
           f"the follower seeing the leader score {version_name(V2)}")
    leader.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    leader.proc.wait()
    # Until the other replica leads, an admin change has nowhere to go: 503, a JSON body and Retry-After.
    resp = httpx.post(f"{follower.url}/admin/unpin", headers=AUTH, timeout=30)
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) > 0, resp.text
    assert "unreachable" in resp.json()["error"]["message"]
    _until(lambda: follower.leader()["leading"], 60, f"{follower.name} leading")
    failover = time.monotonic() - killed_at
    rec = _decided(follower, V2)
    assert rec["status"] == "passed" and rec["promoted"], rec
    assert follower.served() == str(V2)
    # The next version is scored by the new leader.
    publish(producer, TOPIC_ADAPTERS, version_name(V3), noisy_adapter(vllm_store, model_dir, V3, 1e-5, seed=23,
                                                                      parent=V2))
    assert _decided(follower, V3)["promoted"]
    _until(lambda: version_name(V3) in follower.decisions(), 10, "the decision in the log")  # logged just after
    time.sleep(1)  # (a second decision, if there were one, would be logged by now)
    decided = Counter(leader.decisions() + follower.decisions())
    session_s = GatewaySettings.model_fields["leader_session_timeout_s"].default
    print(f"fail-over after kill -9 of the leader: {failover:.1f}s (session timeout {session_s:g}s); "
          f"decisions: {dict(decided)}")
    assert decided == Counter({"base": 1, version_name(V1): 1, version_name(V2): 1, version_name(V3): 1}), decided
    assert version_name(V2) not in leader.decisions() and version_name(V3) not in leader.decisions()
