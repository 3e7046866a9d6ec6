"""Kafka security settings (TLS, SASL) reach every Kafka client odpo builds.

Every producer, consumer and admin client is made by core/bus.py's `new_producer`, `new_consumer` and
`new_admin`, which add `CommonSettings.kafka_*`. The first test reads the code (AST) and fails on any
other construction of a kafka-python client; the second builds every client of every component with the
kafka-python classes replaced by recorders and checks each got the security settings; the last runs a
gate and a gateway on the real (Tansu, PLAINTEXT) broker with the settings configured explicitly.

Not tested here: a SASL or TLS handshake with a real broker (Tansu, the broker these tests run, speaks
neither); the settings are kafka-python's own arguments, passed through unchanged.
"""

from __future__ import annotations

import ast
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from core import bus
from core.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[1]
KAFKA_CLASSES = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient"}
FACTORIES = {"new_producer", "new_consumer", "new_admin"}
SASL = dict(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="odpo",
            kafka_sasl_password="pw-123", kafka_ssl_cafile=Path("/etc/kafka/ca.pem"))
EXPECTED = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "odpo",
            "sasl_plain_password": "pw-123", "ssl_cafile": "/etc/kafka/ca.pem"}


def _code_files():
    for folder in ("core", "generator", "judge", "trainer", "service", "benchmarks"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_module_builds_a_kafka_client_but_core_bus_factories():
    """A kafka-python client built anywhere else would miss the security settings."""
    offenders = []
    for path in _code_files():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name not in KAFKA_CLASSES:
                continue
            scope = node
            while scope in parents and not isinstance(scope, ast.FunctionDef):
                scope = parents[scope]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if path.relative_to(ROOT) != Path("core/bus.py") or getattr(scope, "name", None) not in FACTORIES:
                offenders.append(where)
            elif not any(isinstance(k.value, ast.Call) and getattr(k.value.func, "id", None) == "kafka_client_config"
                         for k in node.keywords if k.arg is None):
                offenders.append(f"{where} (without kafka_client_config)")
    assert not offenders, f"Kafka clients built outside core.bus's factories: {offenders}"


class _Recorder:
    """Stands in for a kafka-python class: records the arguments, answers what the callers ask."""

    made: list[tuple[str, dict]] = []

    def __init__(self, *topics, **config):
        self.made.append((type(self).__name__, config))

    def __getattr__(self, name):
        answers = {"partitions_for_topic": {0}, "list_topics": [], "end_offsets": defaultdict(int),
                   "assignment": set(), "poll": {}}
        return lambda *a, **k: answers.get(name)


class KafkaProducer(_Recorder):
    pass


class KafkaConsumer(_Recorder):
    pass


class KafkaAdminClient(_Recorder):
    pass


@pytest.fixture()
def recorded(monkeypatch):
    """The kafka-python classes of core.bus replaced by recorders, and SASL_SSL settings configured."""
    for cls in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        monkeypatch.setattr(bus, cls.__name__, cls)
    _Recorder.made = []
    monkeypatch.setattr(bus, "_security", None)  # put back as it was at the end
    bus.configure_kafka(CommonSettings(**SASL))
    yield _Recorder.made


def test_every_client_of_every_component_gets_the_security_settings(recorded, tmp_path):
    from core.broker import kafka_ready
    from core.contracts import AdapterReady
    from service.gateway.outbox import Outbox
    from service.registry.book import VersionBook
    from service.registry.follower import RegistryFollower
    from service.up_pace import TrainerBacklog

    producer = bus.make_producer("k:9093")
    bus.ensure_topics("k:9093", ["odpo.x"])
    bus.Inbox("k:9093", "odpo.adapters", AdapterReady, "test", producer, group_id=None)  # generator, gate
    bus.Inbox("k:9093", "odpo.prompts", AdapterReady, "test", producer, group_id="g")  # judge, trainer, generator
    bus.TopicTail("k:9093", ["odpo.candidates"])  # odpo up's view
    kafka_ready("k:9093", 1.0)  # the gateway's broker check, odpo up
    Outbox("k:9093", 10, 1.0)._connect()  # the gateway's prompts and feedback
    RegistryFollower(VersionBook(0.0), "k:9093", "odpo.control", "test")._connect()  # gateway and gate
    TrainerBacklog("k:9093", "odpo-trainer", 10).refresh()  # odpo up's back-pressure
    kinds = {kind for kind, _ in recorded}
    assert kinds == {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient"}, kinds
    assert len(recorded) >= 9
    for kind, config in recorded:
        assert config["bootstrap_servers"] == "k:9093"
        assert {k: config.get(k) for k in EXPECTED} == EXPECTED, kind


def test_security_settings_are_validated_and_the_password_file_is_read(tmp_path, monkeypatch):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs kafka_sasl_username"):
        CommonSettings(kafka_security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValidationError, match="not both"):
        CommonSettings(**SASL, kafka_sasl_password_file=tmp_path / "pw")
    with pytest.raises(ValidationError, match="go together"):
        CommonSettings(kafka_security_protocol="SSL", kafka_ssl_certfile=tmp_path / "c.pem")
    (tmp_path / "pw").write_text("from-a-secret\n")
    monkeypatch.setenv("ODPO_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("ODPO_KAFKA_SASL_USERNAME", "odpo")
    monkeypatch.setenv("ODPO_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "pw"))
    assert bus.kafka_security(CommonSettings()) == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_plain_username": "odpo",
        "sasl_plain_password": "from-a-secret"}
    assert bus.kafka_security(CommonSettings(kafka_security_protocol="PLAINTEXT")) == {
        "security_protocol": "PLAINTEXT"}
    # a process that never configured its clients reads the settings from its environment on first use
    monkeypatch.setattr(bus, "_security", None)
    assert bus.kafka_client_config(acks="all")["sasl_plain_password"] == "from-a-secret"


def test_a_bad_security_setting_is_one_line_and_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ODPO_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "ODPO_KAFKA_SASL_USERNAME": "odpo",
           "ODPO_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "missing")}
    r = subprocess.run([sys.executable, "-m", "service.cli", "judge"], capture_output=True, text=True, env=env,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "missing" in r.stderr


def test_plaintext_still_works_end_to_end_through_the_gate_and_a_gateway(own_broker, monkeypatch):
    """Security settings configured explicitly (PLAINTEXT, the Tansu broker's only protocol): the gate writes
    the registry and the gateway reads it, and a prompt posted to the gateway reaches odpo.prompts."""
    from core.broker import free_port
    from core.contracts import TOPIC_PROMPTS
    from core.settings import GateSettings, GatewaySettings
    from tests.gateway_server import running_loop

    monkeypatch.setattr(bus, "_security", None)
    common = CommonSettings(bootstrap_servers=own_broker.bootstrap, kafka_security_protocol="PLAINTEXT")
    engine = f"http://127.0.0.1:{free_port()}"  # no engine: Kafka alone is under test
    with running_loop(GateSettings(vllm_url=engine), GatewaySettings(vllm_url=engine), common,
                      promote=False) as (gateway, gate):
        assert bus._security == {"security_protocol": "PLAINTEXT"}
        assert httpx.get(f"{gate}/readyz", timeout=10).json()["control"]["writing"]
        deadline = time.monotonic() + 30
        while "not read yet" in (why := httpx.get(f"{gateway}/readyz", timeout=10).text):
            assert time.monotonic() < deadline, "the gateway did not read the gate's registry"
            time.sleep(0.1)
        assert f"broker {own_broker.bootstrap} ok" in why  # its admin-client check reached the broker too
        resp = httpx.post(f"{gateway}/v1/prompts", timeout=30, json={"prompts": [
            {"text": "Describe snow in one sentence.", "task": {"kind": "constraints", "constraints": []}}]})
        assert resp.status_code == 202, resp.text
        tail = bus.TopicTail(own_broker.bootstrap, [TOPIC_PROMPTS])
        try:
            deadline, seen = time.monotonic() + 30, []
            while not any(b"Describe snow in one sentence." in r.value for r in seen):
                assert time.monotonic() < deadline, "the prompt did not reach odpo.prompts"
                seen += tail.poll(500)
        finally:
            tail.close()
