"""One deployment's topic names and shape (core/topics.py): prefix, partitions, replication factor, groups.

The first tests read the code (AST): no module hands a `TOPIC_*` base name to a Kafka call or compares a
record's topic with one, outside `topic_name`. The broker test runs a slice of the loop with the prefix
`team-a.` on a broker of its own that starts with no topic (ensure_topics, a dataset load, a group consumer
that dead-letters, odpo up's view and back-pressure reader, the gate writing odpo.control and a gateway reading
it and taking a prompt) and then lists every topic and consumer group on the broker: each starts with the
prefix, and the partitioned topics have the partitions asked for. A second deployment (`team-b.`) on the same
broker sees none of team-a's messages.

Not tested: a replication factor above 1 (Tansu is one broker and holds one replica; the factor is handed to
CreateTopics as it is, and a test with 1 checks that path).
"""

from __future__ import annotations

import ast
import time
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from core import bus, contracts, topics
from core.broker import EmbeddedBroker
from core.contracts import TOPIC_ADAPTERS, TOPIC_CONTROL, TOPIC_PREFERENCES, TOPIC_PROMPTS, PromptEvent
from core.settings import CommonSettings
from core.topics import PARTITIONED, TopicLayout, topic_name

ROOT = Path(__file__).resolve().parents[1]
BASE_NAMES = {name for name in dir(contracts) if name.startswith("TOPIC_") and isinstance(getattr(contracts, name), str)}
EXEMPT = {Path("core/contracts.py"), Path("core/topics.py")}
NOT_IO = {"topic_name", "frozenset", "set", "tuple", "list", "dict"}  # naming, or a collection of base names


def _code_files():
    for folder in ("core", "generator", "judge", "trainer", "service", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.relative_to(ROOT) not in EXEMPT:
                yield path


def _bare_names(node: ast.AST):
    """TOPIC_* names in `node` outside a nested call (a nested call is checked on its own)."""
    if isinstance(node, ast.Name) and node.id in BASE_NAMES:
        yield node
    elif not isinstance(node, ast.Call):
        for child in ast.iter_child_nodes(node):
            yield from _bare_names(child)


def test_no_module_hands_a_base_topic_name_to_kafka():
    """A `TOPIC_*` constant is a base name: one passed to publish, send, Inbox, TopicTail, an outbox ... or
    compared with a record's topic would miss the deployment's prefix."""
    offenders = []
    for path in _code_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if func in NOT_IO:
                    continue
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    offenders += [f"{path.relative_to(ROOT)}:{n.lineno} {n.id} in {func}()" for n in _bare_names(arg)]
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr.endswith("topic") for s in sides):
                    offenders += [f"{path.relative_to(ROOT)}:{s.lineno} {s.id} compared with a record's topic"
                                  for s in sides if isinstance(s, ast.Name) and s.id in BASE_NAMES]
    assert not offenders, "base topic names used for I/O:\n" + "\n".join(offenders)


def test_the_scan_finds_a_bare_name():
    tree = ast.parse("publish(p, TOPIC_PROMPTS, k, m)\nsend(p, topic_name(TOPIC_PROMPTS), k, v)")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") != "topic_name"]
    found = [n.id for c in calls for a in c.args for n in _bare_names(a)]
    assert found == ["TOPIC_PROMPTS"]


def test_layout_names_groups_and_partitions():
    layout = TopicLayout(prefix="team-a.", partitions=4, replication_factor=3)
    assert layout.name(TOPIC_PROMPTS) == "team-a.odpo.prompts" and layout.group("odpo-generator") == "team-a.odpo-generator"
    assert layout.base("team-a.odpo.prompts") == TOPIC_PROMPTS and layout.base("odpo.prompts") == TOPIC_PROMPTS
    assert {layout.base(t) for t in layout.all_topics()} == set(contracts.ALL_TOPICS)
    assert all(t.startswith("team-a.") for t in layout.all_topics())
    for base in contracts.ALL_TOPICS:
        assert layout.partitions_of(layout.name(base)) == (4 if base in PARTITIONED else 1), base
    # odpo.control (partition 0 only, one order) and odpo.adapters (one writer, versions in order) keep one
    assert layout.partitions_of("team-a.odpo.control") == layout.partitions_of("team-a.odpo.adapters") == 1
    assert layout.partitions_of("team-a.odpo.control.custom") == 1  # a gate's own control_topic
    default = TopicLayout()
    assert default.name(TOPIC_PROMPTS) == "odpo.prompts" and default.group("odpo-trainer") == "odpo-trainer"


def test_settings_take_the_layout_and_refuse_bad_values(monkeypatch):
    monkeypatch.setenv("ODPO_TOPIC_PREFIX", "team-a.")
    monkeypatch.setenv("ODPO_TOPIC_PARTITIONS", "6")
    monkeypatch.setenv("ODPO_TOPIC_REPLICATION_FACTOR", "3")
    assert topics.layout_of(CommonSettings()) == TopicLayout("team-a.", 6, 3)
    monkeypatch.setattr(topics, "_layout", None)  # a process that never configured reads its environment
    assert topic_name(TOPIC_PREFERENCES) == "team-a.odpo.preferences"
    assert topics.group_name("odpo-judge") == "team-a.odpo-judge"
    monkeypatch.setattr(topics, "_layout", None)
    for field, bad in (("topic_prefix", "team a/"), ("topic_partitions", 0), ("topic_replication_factor", 0)):
        with pytest.raises(ValidationError, match=field):
            CommonSettings(**{field: bad})


def test_a_bad_prefix_is_one_line_and_exit_2(monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setenv("ODPO_TOPIC_PREFIX", "team a")
    assert main(["config", "show", "--section", "common"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ODPO_TOPIC_PREFIX" in err, err


# -- on a broker of its own -------------------------------------------------------------------------------------

@pytest.fixture()
def bare_broker():
    """A broker with no topic at all: whatever exists afterwards, the code under test created."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture()
def layout_restored(monkeypatch):
    """Put this process's layout and security settings back as they were (other tests use the default)."""
    monkeypatch.setattr(topics, "_layout", topics._layout)
    monkeypatch.setattr(bus, "_security", bus._security)


def _deploy(bootstrap: str, prefix: str, partitions: int) -> CommonSettings:
    common = CommonSettings(bootstrap_servers=bootstrap, topic_prefix=prefix, topic_partitions=partitions,
                            kafka_security_protocol="PLAINTEXT")
    bus.configure_kafka(common)
    return common


def _drain(inbox, want: int, timeout_s: float = 30) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += inbox.poll(300)
    return got


def test_a_prefixed_deployment_touches_only_its_own_topics_and_groups(bare_broker, layout_restored, tmp_path):
    from core.broker import free_port
    from core.dataset_load import load_and_publish
    from core.settings import GateSettings, GatewaySettings
    from service.loop_watch import LoopWatcher
    from service.up_pace import TrainerBacklog
    from tests.gateway_server import running_loop

    bootstrap = bare_broker.bootstrap
    _deploy(bootstrap, "team-a.", 3)
    bus.ensure_topics(bootstrap)
    admin = bus.new_admin(bootstrap)
    consumer = bus.new_consumer(bootstrap)
    try:
        made = set(admin.list_topics())
        assert made == {f"team-a.{t}" for t in contracts.ALL_TOPICS}, made
        for base in contracts.ALL_TOPICS:
            want = 3 if base in PARTITIONED else 1
            assert consumer.partitions_for_topic(f"team-a.{base}") == set(range(want)), base
        assert consumer.partitions_for_topic(f"team-a.{TOPIC_CONTROL}") == {0}
        assert consumer.partitions_for_topic(f"team-a.{TOPIC_ADAPTERS}") == {0}

        # a dataset load, a generator-like group consumer that dead-letters a bad record
        lines = [f'{{"id": "a-{i}", "text": "Say hi number {i}."}}' for i in range(6)]
        (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
        assert "team-a.odpo.prompts" in load_and_publish(tmp_path / "prompts.jsonl", "prompts", bootstrap)
        producer = bus.make_producer(bootstrap)
        bus.send(producer, topic_name(TOPIC_PROMPTS), "bad", b'{"id": "", "text": "x"}').get(timeout=30)
        inbox = bus.Inbox(bootstrap, topic_name(TOPIC_PROMPTS), PromptEvent, "generator", producer,
                          group_id="odpo-generator")
        got = _drain(inbox, 6)
        assert sorted(e.value.id for e in got) == [f"a-{i}" for i in range(6)] and inbox.dead_lettered == 1
        assert {e.partition for e in got} <= {0, 1, 2} and all(e.topic == "team-a.odpo.prompts" for e in got)
        inbox.commit(got)
        inbox.close()
        TrainerBacklog(bootstrap, "odpo-trainer", 10).refresh()  # odpo up's back-pressure: the trainer group
        watcher = LoopWatcher(bootstrap)
        watcher.start()
        deadline = time.monotonic() + 30
        while watcher.snapshot().dead_letters < 1:  # the dead letter went to team-a.odpo.dlq
            assert time.monotonic() < deadline, "odpo up's view did not see the prefixed DLQ"
            time.sleep(0.2)
        watcher.stop()

        # the gate writes its registry, a gateway reads it and takes a prompt and serves feedback's topics
        common = _deploy(bootstrap, "team-a.", 3)
        engine = f"http://127.0.0.1:{free_port()}"  # no engine: Kafka alone is under test
        with running_loop(GateSettings(vllm_url=engine), GatewaySettings(vllm_url=engine), common,
                          promote=False) as (gateway, gate):
            deadline = time.monotonic() + 30
            while "not read yet" in httpx.get(f"{gateway}/readyz", timeout=10).text:
                assert time.monotonic() < deadline, "the gateway did not read the gate's registry"
                time.sleep(0.1)
            resp = httpx.post(f"{gateway}/v1/prompts", timeout=30, json={"prompts": [{"text": "Describe snow."}]})
            assert resp.status_code == 202, resp.text
            tail = bus.TopicTail(bootstrap, [topic_name(TOPIC_PROMPTS)])
            try:
                deadline, seen = time.monotonic() + 30, []
                while not any(b"Describe snow." in r.value for r in seen):
                    assert time.monotonic() < deadline, "the prompt did not reach team-a.odpo.prompts"
                    seen += tail.poll(300)
            finally:
                tail.close()

        every_topic = set(admin.list_topics())
        assert every_topic and all(t.startswith("team-a.") for t in every_topic), every_topic
        assert any(t.startswith("team-a.odpo.control.") for t in every_topic)  # the gate's (scoped) control topic
        assert consumer.partitions_for_topic(next(t for t in every_topic if ".odpo.control." in t)) == {0}
        groups = {g["group_id"] if isinstance(g, dict) else g[0] for g in admin.list_groups()}
        assert "team-a.odpo-generator" in groups, groups
        assert all(g.startswith("team-a.") for g in groups), groups

        # a second deployment on the same broker: its own topics, nothing of team-a's
        _deploy(bootstrap, "team-b.", 1)
        bus.ensure_topics(bootstrap)
        bus.publish(producer, topic_name(TOPIC_PROMPTS), "b-1", PromptEvent(id="b-1", text="Team b only."))
        b_inbox = bus.Inbox(bootstrap, topic_name(TOPIC_PROMPTS), PromptEvent, "generator", producer,
                            group_id="odpo-generator")
        b_got = _drain(b_inbox, 1)
        time.sleep(1)
        b_got += b_inbox.poll(500)
        b_inbox.close()
        assert [e.value.id for e in b_got] == ["b-1"] and b_got[0].topic == "team-b.odpo.prompts"
        _deploy(bootstrap, "team-a.", 3)
        a_inbox = bus.Inbox(bootstrap, topic_name(TOPIC_PROMPTS), PromptEvent, "generator", producer,
                            group_id=f"odpo-check-{uuid.uuid4().hex[:6]}")
        a_seen = _drain(a_inbox, 7, timeout_s=15)
        a_inbox.close()
        assert "b-1" not in {e.value.id for e in a_seen} and len(a_seen) == 7  # 6 loaded + the gateway's prompt
        assert all(t.startswith(("team-a.", "team-b.")) for t in admin.list_topics())
        producer.close()
    finally:
        consumer.close()
        admin.close()


def test_ensure_topics_leaves_an_existing_topic_and_takes_the_replication_factor(bare_broker, layout_restored,
                                                                                 monkeypatch):
    """A topic that exists keeps its partitions; CreateTopics gets the configured factor (1: Tansu is one
    broker)."""
    from kafka.admin import KafkaAdminClient

    bootstrap = bare_broker.bootstrap
    _deploy(bootstrap, "t.", 2)
    asked = []
    real = KafkaAdminClient.create_topics
    monkeypatch.setattr(KafkaAdminClient, "create_topics",
                        lambda self, new, **kw: (asked.extend(new), real(self, new, **kw))[1])
    bus.ensure_topics(bootstrap, [topic_name(TOPIC_PROMPTS)])
    assert [(t.name, t.num_partitions, t.replication_factor) for t in asked] == [("t.odpo.prompts", 2, 1)]
    _deploy(bootstrap, "t.", 5)
    bus.ensure_topics(bootstrap, [topic_name(TOPIC_PROMPTS)])
    consumer = bus.new_consumer(bootstrap)
    try:
        assert consumer.partitions_for_topic("t.odpo.prompts") == {0, 1}
    finally:
        consumer.close()
