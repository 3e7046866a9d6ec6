"""The official `openai` client against the running gateway, in front of the real vLLM (the session server).

Chat and text completions, streamed and not, model aliases, the responses'
ids turned into feedback on odpo.feedback (and by the judge's `human`
plugin into a pair on odpo.preferences), prompts mirrored into
odpo.prompts (and kept out with `x-odpo-no-learn`), and /v1/prompts. The
gateway gets its own Tansu broker, so nothing it publishes reaches other
tests' consumers.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from core.bus import ensure_topics
from core.contracts import TOPIC_FEEDBACK, TOPIC_PREFERENCES, TOPIC_PROMPTS, Feedback, PreferencePair, PromptEvent
from service.launcher import Launcher
from core.settings import CommonSettings, GatewaySettings
from tests.gateway_server import noisy_adapter, register_base, running_gateway
from tests.topics import MessageTail

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

ADAPTER_VERSION = 611  # a name no other test of the session uses
QUESTION = [{"role": "user", "content": "Name three colors."}]
TEXT_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gateway(vllm_server, model_dir, vllm_store, own_broker):
    register_base(vllm_server.url, model_dir, vllm_store)
    ready = noisy_adapter(vllm_store, model_dir, ADAPTER_VERSION, scale=0.05, seed=1)
    resp = httpx.post(f"{vllm_server.url}/v1/load_lora_adapter",
                      json={"lora_name": f"policy-v{ADAPTER_VERSION}", "lora_path": str(vllm_store / ready.path)})
    assert resp.status_code == 200 or "already been loaded" in resp.text, resp.text
    settings = GatewaySettings(vllm_url=vllm_server.url, mirror_fraction=1.0)
    common = CommonSettings(bootstrap_servers=own_broker.bootstrap, store_dir=vllm_store)
    with running_gateway(settings, common) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, model: str, **kw):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=QUESTION, max_tokens=8,
                                                           temperature=0, **kw)
    return raw.parse(), raw.headers["x-odpo-policy-version"]


def test_chat_and_completion_through_the_gateway_equal_the_engine(client, vllm_server):
    chat, version = _chat(client, "policy")
    assert version == "0" and chat.model == "base", "`policy` is `base` until a version is promoted"
    assert chat.id and chat.choices[0].message.content
    direct = httpx.post(f"{vllm_server.url}/v1/chat/completions", timeout=120, json={
        "model": "base", "messages": QUESTION, "max_tokens": 8, "temperature": 0}).json()
    assert chat.choices[0].message.content == direct["choices"][0]["message"]["content"]

    text = client.completions.create(model="base", prompt=TEXT_PROMPT, max_tokens=6, temperature=0)
    direct = httpx.post(f"{vllm_server.url}/v1/completions", timeout=120, json={
        "model": "base", "prompt": TEXT_PROMPT, "max_tokens": 6, "temperature": 0}).json()
    assert text.id and text.choices[0].text == direct["choices"][0]["text"]


def test_streams_carry_the_same_text(client):
    whole, _ = _chat(client, "base")
    chunks = list(client.chat.completions.create(model="policy", messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True))
    assert len(chunks) > 2 and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content

    whole = client.completions.create(model="base", prompt=TEXT_PROMPT, max_tokens=6, temperature=0)
    streamed = list(client.completions.create(model="base", prompt=TEXT_PROMPT, max_tokens=6, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_model_aliases(client, gateway):
    names = {m.id for m in client.models.list()}
    assert {"policy", "base", f"policy-v{ADAPTER_VERSION}"} <= names
    chat, version = _chat(client, f"policy-v{ADAPTER_VERSION}")
    assert version == str(ADAPTER_VERSION) and chat.model == f"policy-v{ADAPTER_VERSION}"
    for unknown in ("gpt-4", "policy-v999999", "policy-v0"):
        with pytest.raises(openai.NotFoundError):
            _chat(client, unknown)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="policy", messages=QUESTION, max_tokens=0)
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'odpo_gateway_requests_total{alias="policy",route="/v1/chat/completions",status="200"}' in metrics
    assert 'odpo_gateway_requests_total{alias="version",route="/v1/chat/completions",status="200"}' in metrics
    assert 'odpo_gateway_requests_total{alias="other",route="/v1/chat/completions",status="404"}' in metrics


def test_feedback_round_trip_ends_on_the_feedback_topic(client, gateway, own_broker):
    greedy, _ = _chat(client, "policy")
    sampled = client.chat.completions.create(model="policy", messages=QUESTION, max_tokens=8, temperature=1.5,
                                             seed=7, n=2)
    assert len(sampled.choices) == 2
    other_id = f"{sampled.id}:1"
    streamed = list(client.chat.completions.create(model="base", messages=QUESTION, max_tokens=8, temperature=0,
                                                   stream=True))
    stream_id = streamed[0].id

    choice = httpx.post(f"{gateway}/v1/feedback", json={
        "response_id": greedy.id, "other_response_id": other_id, "preferred": "other"})
    assert choice.status_code == 202, choice.text
    rating = httpx.post(f"{gateway}/v1/feedback", json={"response_id": stream_id, "rating": -0.5})
    assert rating.status_code == 202, rating.text

    tail = MessageTail(own_broker.bootstrap, TOPIC_FEEDBACK, Feedback)
    try:
        got = tail.wait_for(lambda f: f.response_id == greedy.id, 30, "the choice on odpo.feedback")[0]
        assert got.preferred == "other" and got.other_response_id == other_id
        assert got.response.text == greedy.choices[0].message.content and got.response.policy_version == 0
        assert got.other_response.text == sampled.choices[1].message.content
        assert [m.model_dump() for m in got.prompt.messages] == QUESTION and got.prompt.source == "gateway"
        rated = tail.wait_for(lambda f: f.response_id == stream_id, 30, "the rating on odpo.feedback")[0]
        assert rated.rating == -0.5 and rated.other_response is None
        assert rated.response.text == "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    finally:
        tail.close()


def test_prompts_are_mirrored_unless_opted_out(client, gateway, own_broker):
    kept_out, mirrored = (f"Say {uuid.uuid4().hex[:6]} back." for _ in range(2))
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": kept_out}], max_tokens=2,
                                   extra_headers={"x-odpo-no-learn": "1"})
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": mirrored}], max_tokens=2)
    enqueued = httpx.post(f"{gateway}/v1/prompts", json={"prompts": [
        {"id": "api-1", "text": "Describe snow.", "task": {"kind": "constraints", "constraints": []}}]})
    assert enqueued.status_code == 202 and enqueued.json()["ids"] == ["api-1"]

    tail = MessageTail(own_broker.bootstrap, TOPIC_PROMPTS, PromptEvent)
    try:
        seen = tail.wait_for(lambda p: p.id == "api-1", 30, "the enqueued prompt")
        assert seen[-1].source == "api" and seen[-1].task["kind"] == "constraints"
        tail.wait_for(lambda p: p.messages and p.messages[0].content == mirrored, 30, "the mirrored prompt")
        # The mirror queue is first-in first-out: the opted-out prompt would have been published first.
        assert not [p for p in tail.seen if p.messages and p.messages[0].content == kept_out]
        assert all(p.source == "gateway" for p in tail.seen if p.id != "api-1")
    finally:
        tail.close()
    assert "odpo_gateway_mirrored_prompts_total" in httpx.get(f"{gateway}/metrics").text


def test_feedback_becomes_a_pair_through_the_human_judge(client, gateway, own_broker, tmp_path):
    """`odpo judge` with the `human` plugin turns the gateway's feedback into a pair on odpo.preferences."""
    launcher = Launcher(tmp_path / "logs", {"ODPO_BOOTSTRAP_SERVERS": own_broker.bootstrap,
                                            "ODPO_JUDGE_JUDGE": "human"})
    launcher.start("judge")
    tail = MessageTail(own_broker.bootstrap, TOPIC_PREFERENCES, PreferencePair)
    try:
        question = [{"role": "user", "content": "Name a fruit."}]
        greedy = client.chat.completions.create(model="policy", messages=question, max_tokens=8, temperature=0)
        sampled = client.chat.completions.create(model="policy", messages=question, max_tokens=8, temperature=1.5,
                                                 seed=11, n=2)
        index = next(i for i, c in enumerate(sampled.choices) if c.message.content != greedy.choices[0].message.content)
        resp = httpx.post(f"{gateway}/v1/feedback", json={
            "response_id": greedy.id, "other_response_id": f"{sampled.id}:{index}", "preferred": "this"})
        assert resp.status_code == 202, resp.text
        pair = tail.wait_for(lambda p: p.judge == "human" and p.prompt.messages[0].content == "Name a fruit.", 90,
                             "the human judge's pair on odpo.preferences")[0]
        assert pair.chosen == greedy.choices[0].message.content
        assert pair.rejected == sampled.choices[index].message.content and pair.policy_version == 0
        launcher.check()
    finally:
        tail.close()
        launcher.stop()


def test_new_tokens_are_capped(vllm_server, own_broker, vllm_store):
    """Above the cap: 400 with a JSON body (the openai client's BadRequestError). None asked: the cap applies,
    and where a long prompt leaves less room than the cap the engine lowers it instead of failing."""
    settings = GatewaySettings(vllm_url=vllm_server.url, max_tokens_cap=5)
    common = CommonSettings(bootstrap_servers=own_broker.bootstrap, store_dir=vllm_store)
    with running_gateway(settings, common) as url:
        capped = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError, match="at most 5 new tokens") as refused:
            capped.chat.completions.create(model="base", messages=QUESTION, max_tokens=6)
        assert refused.value.body["code"] == "max_tokens_too_large"
        with pytest.raises(openai.BadRequestError, match="max_completion_tokens 9"):
            capped.chat.completions.create(model="base", messages=QUESTION, max_completion_tokens=9)
        chat = capped.chat.completions.create(model="base", messages=QUESTION, temperature=0)
        assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
        text = capped.completions.create(model="base", prompt=TEXT_PROMPT, max_tokens=5, temperature=0)
        assert text.usage.completion_tokens <= 5

    # The default cap (1024) with a prompt that leaves only a few hundred tokens of the 2048 context.
    with running_gateway(GatewaySettings(vllm_url=vllm_server.url), common) as url:
        long_prompt = "one two three four five six seven eight nine ten " * 180  # about 1,980 tokens: ~68 left
        resp = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": "base", "prompt": long_prompt, "temperature": 0})
        assert resp.status_code == 200, resp.text
        usage = resp.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 2048


def test_a_broker_outage_does_not_stop_serving(client, gateway, own_broker):
    """Serving needs no Kafka: with the broker gone, 100 completions are all answered and /readyz stays 200
    (the outage in its body and in odpo_gateway_broker_up); feedback answers 503 meanwhile (nothing taken
    and lost) and flows again once the broker is back."""
    assert httpx.get(f"{gateway}/readyz", timeout=30).json()["broker"] == "ok"
    own_broker.stop()
    try:
        deadline = time.monotonic() + 30  # /readyz reuses a broker check for broker_check_s (5 s)
        while (ready := httpx.get(f"{gateway}/readyz", timeout=30)).json().get("broker") != "unreachable":
            assert ready.status_code == 200 and time.monotonic() < deadline, ready.text
            time.sleep(1)
        assert ready.status_code == 200, ready.text
        assert "odpo_gateway_broker_up 0.0" in httpx.get(f"{gateway}/metrics").text
        with ThreadPoolExecutor(8) as pool:  # what a client sees: every completion answered
            answers = list(pool.map(lambda i: client.chat.completions.create(
                model="policy", messages=[{"role": "user", "content": f"Say a number: {i}"}], max_tokens=2,
                temperature=0), range(100)))
        assert all(a.choices[0].message.content is not None for a in answers) and len(answers) == 100
        outage_id = answers[0].id
        lost = httpx.post(f"{gateway}/v1/feedback", json={"response_id": outage_id, "rating": 1.0}, timeout=60)
        assert lost.status_code == 503 and lost.json()["error"]["message"], lost.text
    finally:
        own_broker.start()  # the same address, empty (memory-only): the topics come back with it
        ensure_topics(own_broker.bootstrap)
    tail = MessageTail(own_broker.bootstrap, TOPIC_FEEDBACK, Feedback)
    try:
        deadline = time.monotonic() + 60
        while True:  # the gateway's producer reconnects
            resp = httpx.post(f"{gateway}/v1/feedback", json={"response_id": outage_id, "rating": 1.0}, timeout=60)
            if resp.status_code == 202 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert resp.status_code == 202, resp.text
        got = tail.wait_for(lambda f: f.response_id == outage_id, 30, "feedback after the outage")[0]
        assert got.rating == 1.0 and got.response.text == answers[0].choices[0].message.content
    finally:
        tail.close()
    deadline = time.monotonic() + 30
    while httpx.get(f"{gateway}/readyz", timeout=30).json().get("broker") != "ok":
        assert time.monotonic() < deadline, "the broker's return did not show in /readyz"
        time.sleep(1)
