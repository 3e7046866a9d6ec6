"""Feedback through any gateway replica, also after restarts: what a replica serves goes to odpo.served.

Two real gateways (uvicorn in this process, no control plane: the served log
does not need it) on one Tansu broker of this module's own and the session's
real vLLM. A response served by one is rated and compared through the other
at once (no 404 by a race), the texts on odpo.feedback are the served ones
and the human judge pairs them; new replicas after a restart still know what
the old ones served (and skip what is past the retention); `x-odpo-no-learn`
responses are neither kept nor published; with the broker away completions
are still served, the unpublished record is counted, and once a broker comes
the gateway creates odpo.served itself.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from kafka import KafkaAdminClient

from core.broker import EmbeddedBroker, free_port
from core.bus import ensure_topics, make_producer, publish
from core.contracts import (ALL_TOPICS, TOPIC_FEEDBACK, TOPIC_PREFERENCES, TOPIC_SERVED, ChatMessage, Feedback,
                            PreferencePair, PromptEvent, ServedRecord, ServedText)
from core.settings import CommonSettings, GatewaySettings, JudgeSettings
from tests.gateway_server import register_base, running_gateway
from tests.topics import MessageTail

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

QUESTION = [{"role": "user", "content": "Name three colors."}]
UNPUBLISHED = 'odpo_gateway_served_unpublished_total{reason="broker_error"}'


@pytest.fixture(scope="module")
def replica(vllm_server, model_dir, vllm_store, own_broker):
    """Starts a gateway replica on the module's broker: `with replica(**settings) as url`."""
    register_base(vllm_server.url, model_dir, vllm_store)
    common = CommonSettings(bootstrap_servers=own_broker.bootstrap, store_dir=vllm_store)
    return lambda **kw: running_gateway(GatewaySettings(vllm_url=vllm_server.url, **kw), common)


def _chat(url: str, headers: dict | None = None, **kw) -> dict:
    body = {"model": "base", "messages": QUESTION, "max_tokens": 8, "temperature": 0} | kw
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _streamed(url: str, headers: dict | None = None) -> tuple[str, str]:
    """A streamed chat completion: its id and text."""
    body = {"model": "base", "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True}
    rid, parts = None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[6:]).json()
                rid = chunk["id"]
                parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return rid, "".join(parts)


def _feedback(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/feedback", json=body, timeout=60)


def _text(response: dict, index: int = 0) -> str:
    return response["choices"][index]["message"]["content"]


def _metric(url: str, sample: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_response_served_by_one_replica_is_rated_through_the_other(replica, own_broker, group_id):
    from judge.service import run

    with replica() as a, replica() as b:
        greedy = _chat(a)
        served = time.monotonic()
        # The same response under its two names: refused as identical (400) once B knows it, unknown (404) before.
        probe = _feedback(b, response_id=greedy["id"], other_response_id=f"{greedy['id']}:0", preferred="this")
        visible_s = time.monotonic() - served
        assert probe.status_code == 400 and "identical" in probe.text, probe.text
        rated = _feedback(b, response_id=greedy["id"], rating=1.0)
        assert rated.status_code == 202, rated.text
        print(f"\nserved on A -> known on B: {visible_s * 1000:.0f} ms; -> rating accepted by B: "
              f"{(time.monotonic() - served) * 1000:.0f} ms")

        sampled = _chat(b, temperature=1.5, seed=7, n=2)
        index = next(i for i in (0, 1) if _text(sampled, i) != _text(greedy))
        other_id = f"{sampled['id']}:{index}"
        choice = _feedback(b, response_id=greedy["id"], other_response_id=other_id, preferred="this")
        assert choice.status_code == 202, choice.text
        stream_id, stream_text = _streamed(b)
        assert _feedback(a, response_id=stream_id, rating=-0.5).status_code == 202

    tail = MessageTail(own_broker.bootstrap, TOPIC_FEEDBACK, Feedback)
    try:
        got = tail.wait_for(lambda f: f.other_response_id == other_id, 30, "the choice on odpo.feedback")[0]
        assert [m.model_dump() for m in got.prompt.messages] == QUESTION and got.prompt.source == "gateway"
        assert got.response.text == _text(greedy) and got.response.policy_version == 0
        assert got.other_response.text == _text(sampled, index) and got.preferred == "this"
        rating = tail.wait_for(lambda f: f.response_id == stream_id, 30, "the rating of B's stream via A")[0]
        assert rating.response.text == stream_text and rating.rating == -0.5
    finally:
        tail.close()

    stop = threading.Event()
    settings = JudgeSettings(judge="human", feedback_group_id=group_id, poll_timeout_s=0.2)
    judge = threading.Thread(target=run, args=(CommonSettings(bootstrap_servers=own_broker.bootstrap), settings,
                                               stop), daemon=True)
    judge.start()
    pairs = MessageTail(own_broker.bootstrap, TOPIC_PREFERENCES, PreferencePair)
    try:
        pair = pairs.wait_for(lambda p: p.judge == "human" and p.rejected == _text(sampled, index), 60,
                              "the human judge's pair of the two replicas' responses")[0]
        assert pair.chosen == _text(greedy) and pair.prompt.messages[0].content == QUESTION[0]["content"]
    finally:
        pairs.close()
        stop.set()
        judge.join(timeout=20)


def test_responses_served_before_a_restart_are_known_to_new_replicas(replica, own_broker):
    with replica() as a, replica() as b:
        first, second = _chat(a), _chat(b, temperature=1.5, seed=3)
    # Published here, as another replica would: one within the retention, one past it.
    prompt = PromptEvent(id="gw-elsewhere", messages=[ChatMessage(**QUESTION[0])], source="gateway")
    producer = make_producer(own_broker.bootstrap)
    for rid, age_s in (("chatcmpl-recent", 60), ("chatcmpl-expired", 7200)):
        publish(producer, TOPIC_SERVED, rid, ServedRecord(
            id=rid, choices=[ServedText(prompt=prompt, text=f"Red ({rid}).", policy_version=0)],
            served_at=time.time() - age_s, replica="elsewhere"))
    producer.close()

    with replica(served_retention_s=3600) as a2, replica(served_retention_s=3600) as b2:
        for url in (b2, a2):  # b2 at once: its tail may still be connecting (the ask waits for it)
            for rid in (first["id"], second["id"], "chatcmpl-recent"):
                resp = _feedback(url, response_id=rid, rating=0.5)
                assert resp.status_code == 202, resp.text
        choice = _feedback(b2, response_id=first["id"], other_response_id=second["id"], preferred="other")
        assert choice.status_code == (202 if _text(first) != _text(second) else 400), choice.text
        expired = _feedback(a2, response_id="chatcmpl-expired", rating=0.5)
        assert expired.status_code == 404 and "unknown response id" in expired.text


def test_no_learn_responses_are_neither_kept_nor_published(replica, own_broker):
    no_learn = {"x-odpo-no-learn": "1"}
    with replica() as a, replica() as b:
        hidden = _chat(a, headers=no_learn)["id"]
        hidden_stream, _ = _streamed(a, headers=no_learn)
        shown = _chat(a)["id"]  # published after the hidden ones: the outbox is first-in first-out
        tail = MessageTail(own_broker.bootstrap, TOPIC_SERVED, ServedRecord)
        try:
            tail.wait_for(lambda r: r.id == shown, 30, "the learnable response on odpo.served")
            assert not [r for r in tail.seen if r.id in (hidden, hidden_stream)]
        finally:
            tail.close()
        for url in (a, b):
            for rid in (hidden, hidden_stream):
                resp = _feedback(url, response_id=rid, rating=1.0)
                assert resp.status_code == 404 and "unknown response id" in resp.text, resp.text
        assert _feedback(b, response_id=shown, rating=1.0).status_code == 202


def test_without_a_broker_serving_goes_on_and_the_unpublished_record_is_counted(vllm_server, model_dir, vllm_store):
    register_base(vllm_server.url, model_dir, vllm_store)
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    retention_s = 86_400
    settings = GatewaySettings(vllm_url=vllm_server.url, publish_timeout_s=2,
                               served_retention_s=retention_s)
    with running_gateway(settings, CommonSettings(bootstrap_servers=bootstrap, store_dir=vllm_store)) as url:
        before = _metric(url, UNPUBLISHED)
        outage = _chat(url)
        deadline = time.monotonic() + 30
        while _metric(url, UNPUBLISHED) <= before:
            assert time.monotonic() < deadline, "the unpublished served record was not counted"
            time.sleep(0.5)
        lost = _feedback(url, response_id=outage["id"], rating=1.0)
        assert lost.status_code == 503, lost.text  # known here; the Feedback itself cannot be stored
        assert _feedback(url, response_id="chatcmpl-unknown", rating=1.0).status_code == 404

        with EmbeddedBroker(port=port):  # a broker comes: the gateway creates odpo.served with its retention
            ensure_topics(bootstrap, [t for t in ALL_TOPICS if t != TOPIC_SERVED])
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            try:
                deadline = time.monotonic() + 30
                while TOPIC_SERVED not in admin.list_topics():
                    assert time.monotonic() < deadline, "the gateway did not create odpo.served"
                    time.sleep(0.5)
                configs = admin.describe_configs([_topic_resource(TOPIC_SERVED)])["topic"][TOPIC_SERVED]
            finally:
                admin.close()
            # Tansu 0.6 takes the config on creation but describes no topic config (answers none): where a
            # broker does describe it, it is the gateway's setting.
            assert configs.get("retention.ms", str(retention_s * 1000)) == str(retention_s * 1000), configs
            deadline = time.monotonic() + 30
            while (resp := _feedback(url, response_id=outage["id"], rating=1.0)).status_code != 202:
                assert time.monotonic() < deadline, resp.text
                time.sleep(0.5)
            after = _chat(url, temperature=1.0, seed=5)["id"]
            tail = MessageTail(bootstrap, TOPIC_SERVED, ServedRecord)
            try:
                tail.wait_for(lambda r: r.id == after, 30, "a response served after the broker came")
            finally:
                tail.close()


def _topic_resource(name: str):
    from kafka.admin import ConfigResource, ConfigResourceType

    return ConfigResource(ConfigResourceType.TOPIC, name)
