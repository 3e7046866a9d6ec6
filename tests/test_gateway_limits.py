"""The gateway's limits on what a client may send, over real HTTP, without vLLM.

A body over `max_body_bytes` is a 413 (also when it arrives chunked, without
a Content-Length); a message's content parts are capped; a prompt's task
must be of an allowed kind (the client must not choose what the verifier
rewards); version names match exactly; an unknown `policy-v<N>` is answered
from a negative cache instead of re-reading every engine; versions the gate
refused or an operator rolled back are not served by name.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from core.broker import free_port
from core.contracts import AdapterReady, TrainMetrics, parse_version_name
from core.settings import CommonSettings, GatewaySettings
from service.gateway.endpoints import EnginePool
from service.gateway.engine import EngineAdapters, EngineClients, ModelRouter, UnknownModel
from service.registry.book import VersionBook
from tests.fake_engine import running_fake_engine
from tests.gateway_server import running_gateway

LIMIT = 8192


def _down() -> CommonSettings:
    return CommonSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def gateway():
    settings = GatewaySettings(vllm_url=f"http://127.0.0.1:{free_port()}", publish_timeout_s=2, max_body_bytes=LIMIT)
    with running_gateway(settings, _down()) as url:
        yield url


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["message"] and body["type"] and body["code"]
    return body


def _chat(text: str) -> dict:
    return {"model": "policy", "messages": [{"role": "user", "content": text}]}


def test_a_body_over_the_limit_is_413(gateway):
    resp = httpx.post(f"{gateway}/v1/chat/completions", json=_chat("x" * LIMIT), timeout=10)
    assert _error(resp, 413)["code"] == "request_too_large"
    assert httpx.post(f"{gateway}/v1/chat/completions", json=_chat("x" * (LIMIT // 2)),
                      timeout=10).status_code == 503  # under the limit: on to the (absent) engine


def test_a_chunked_body_is_counted_as_it_arrives(gateway):
    """No Content-Length to trust: the bytes are counted and the body cut off at the limit."""
    body = json.dumps(_chat("x" * (4 * LIMIT))).encode()
    before = _too_large(gateway)  # process-wide: earlier tests (the fuzz test) may have sent big bodies

    def chunks():
        for i in range(0, len(body), 1024):
            yield body[i:i + 1024]

    resp = httpx.post(f"{gateway}/v1/chat/completions", content=chunks(),
                      headers={"content-type": "application/json"}, timeout=10)
    assert "content-length" not in resp.request.headers  # sent chunked: nothing declared
    _error(resp, 413)
    small = json.dumps(_chat("hi")).encode()
    resp = httpx.post(f"{gateway}/v1/chat/completions", content=iter([small[:10], small[10:]]),
                      headers={"content-type": "application/json"}, timeout=10)
    assert resp.status_code == 503, resp.text
    assert _too_large(gateway) == before + 1


def _too_large(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("odpo_gateway_body_too_large_total "):
            return float(line.split()[-1])
    return 0.0


def test_content_parts_are_capped(gateway):
    body = {"model": "policy", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 65}]}
    assert "content" in _error(httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=10), 400)["message"]


@pytest.mark.parametrize("task", [{"kind": "regex", "pattern": "(a+)+$"}, {"kind": "exact", "answer": "yes"},
                                  {"kind": "callable", "path": "os:system"}, {"constraints": []}])
def test_clients_may_not_choose_the_reward(gateway, task):
    body = {"prompts": [{"text": "Describe snow."}, {"text": "Say yes.", "task": task}]}
    error = _error(httpx.post(f"{gateway}/v1/prompts", json=body, timeout=10), 400)
    assert error["code"] == "task_kind_not_allowed" and "prompts.1.task" in error["message"]


@pytest.mark.parametrize("task", [{"kind": "constraints", "constraints": []}, {}])
def test_the_bundled_task_kind_and_no_task_pass(gateway, task):
    body = {"prompts": [{"text": "Describe snow.", "task": task}]}
    _error(httpx.post(f"{gateway}/v1/prompts", json=body, timeout=30), 503)  # on to the (absent) broker


def test_other_task_kinds_when_the_operator_allows_them():
    settings = GatewaySettings(vllm_url=f"http://127.0.0.1:{free_port()}", publish_timeout_s=2,
                               prompt_task_kinds=["constraints", "exact"])
    with running_gateway(settings, _down()) as url:
        body = {"prompts": [{"text": "Say yes.", "task": {"kind": "exact", "answer": "yes"}}]}
        _error(httpx.post(f"{url}/v1/prompts", json=body, timeout=30), 503)


@pytest.mark.parametrize("name", ["policy-v1\n", "policy-v1 ", "policy-v01", "policy-v0", "xpolicy-v1"])
def test_version_names_match_exactly(name):
    assert parse_version_name(name) is None
    assert parse_version_name("policy-v12") == 12 and parse_version_name("base") == 0


def test_a_trailing_newline_is_not_a_version_name(gateway):
    body = {"model": "policy-v1\n", "messages": [{"role": "user", "content": "hi"}]}
    assert "unknown model" in _error(httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=10),
                                     404)["message"]


def test_unknown_versions_do_not_refresh_every_engine_each_time(tmp_path):
    with running_fake_engine(["base"]) as (engine_url, engine):
        settings = GatewaySettings(vllm_url=engine_url, unknown_model_cache_s=30)
        with running_gateway(settings, CommonSettings(bootstrap_servers=f"127.0.0.1:{free_port()}",
                                                      store_dir=tmp_path)) as url:
            with httpx.Client(timeout=10) as client:
                body = {"model": "policy-v999", "messages": [{"role": "user", "content": "hi"}]}
                assert client.post(f"{url}/v1/chat/completions", json=body).status_code == 404
                before = engine.calls["models"]
                for n in [999] * 20 + list(range(1000, 1020)):  # the same name again, and new names
                    body["model"] = f"policy-v{n}"
                    assert _error(client.post(f"{url}/v1/chat/completions", json=body), 404)["code"] == \
                        "model_not_found"
                assert engine.calls["models"] - before <= 2, engine.calls  # listings re-read as usual, not forced


def _ready(version: int) -> AdapterReady:
    return AdapterReady(version=version, path=f"policy-v{version}", sha256="0" * 64, base_model="m",
                        parent_version=version - 1, pairs_trained=8,
                        metrics=TrainMetrics(loss=0.6, reward_margin=0.3, reward_accuracy=0.7, steps=2))


def _book_with_refused_and_rolled_back() -> VersionBook:
    """v1 promoted, v2 promoted then rolled back, v3 refused."""
    book = VersionBook(0.05)
    book.next_evaluation()
    book.decide(0, 0.5)
    for version, score in ((1, 0.6), (2, 0.7)):
        book.add(_ready(version))
        assert book.next_evaluation()[0] == version
        assert book.decide(version, score).promoted
    assert book.rollback() == (2, 1)
    book.add(_ready(3))
    assert book.next_evaluation()[0] == 3
    assert not book.decide(3, 0.1).promoted
    assert (book.status_of(2), book.status_of(3), book.promoted) == ("rolled_back", "refused", 1)
    return book


@pytest.mark.parametrize("serve_refused", [False, True])
def test_refused_and_rolled_back_versions_are_not_served_by_name(tmp_path, serve_refused):
    book = _book_with_refused_and_rolled_back()
    with running_fake_engine(["base", "policy-v1", "policy-v2", "policy-v3"]) as (engine_url, _):
        async def resolve_all():
            pool = EnginePool([engine_url])
            clients = EngineClients(10)
            adapters = EngineAdapters(pool, tmp_path)
            router = ModelRouter(clients, book, adapters, 1.0, unknown_cache_s=2, serve_refused=serve_refused)
            found = {}
            try:
                for name in ("policy", "policy-v1", "policy-v2", "policy-v3", "base"):
                    try:
                        found[name] = (await router.resolve(name))[1]
                    except UnknownModel as exc:
                        found[name] = str(exc)
            finally:
                await clients.aclose()
                adapters.close()
            return found

        found = asyncio.run(resolve_all())
    assert (found["policy"], found["policy-v1"], found["base"]) == (1, 1, 0)
    if serve_refused:
        assert (found["policy-v2"], found["policy-v3"]) == (2, 3)
    else:
        assert "rolled it back" in found["policy-v2"] and "refused" in found["policy-v3"]
