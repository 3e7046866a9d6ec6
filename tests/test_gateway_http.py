"""The gateway and the gate over real HTTP (uvicorn on a free port) with their engine (and broker) down.

Errors are OpenAI-shaped JSON, never tracebacks; bad input is a 4xx; the
gateway has no admin API; the gate's refuses missing or wrong tokens and is
absent without one.
"""

from __future__ import annotations

import time

import httpx
import pytest

from core.broker import free_port
from core.settings import CommonSettings, GateSettings, GatewaySettings
from tests.gateway_server import running_gate, running_gateway

TOKEN = "s3cret-admin-token"
ADMIN_ROUTES = [("GET", "/admin/versions", None), ("POST", "/admin/promote", {"version": 0}),
                ("POST", "/admin/pin", {}), ("POST", "/admin/unpin", None), ("POST", "/admin/rollback", None)]


def _down_settings(**kw) -> tuple[GatewaySettings, CommonSettings]:
    """Nothing listens on the engine's or the broker's port."""
    return (GatewaySettings(vllm_url=f"http://127.0.0.1:{free_port()}", publish_timeout_s=2, **kw),
            CommonSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"))


@pytest.fixture(scope="module")
def gateway():
    with running_gateway(*_down_settings()) as url:
        yield url


def _is_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["message"]
    return body["error"]


def test_health_ready_and_metrics(gateway):
    assert httpx.get(f"{gateway}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway}/readyz", timeout=10)
    message = _is_error(ready, 503)["message"]
    assert "serving engine unreachable" in message and "broker" in message
    assert ready.headers["retry-after"] == "2"  # clients back off instead of hammering a restarting engine
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'odpo_gateway_requests_total{alias="-",route="/readyz",status="503"}' in metrics
    assert "odpo_gateway_policy_version 0.0" in metrics


def test_metrics_port_moves_metrics_off_the_api_port():
    """With `metrics_port`, /metrics answers there only: the API port (the public Service) carries no metrics."""
    port = free_port()
    settings, common = _down_settings(metrics_port=port)
    with running_gateway(settings, common) as url:
        httpx.get(f"{url}/healthz")
        assert _is_error(httpx.get(f"{url}/metrics"), 404)["code"] == "not_found"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert metrics.status_code == 200 and "odpo_gateway_requests_total" in metrics.text
    with pytest.raises(httpx.ConnectError):  # stopped with the gateway
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


CHAT = '{"model": "policy", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "valid dictionary"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model: Field required"),
    (b'{"model": "policy"}', 400, "messages: Field required"),
    (b'{"model": "policy", "messages": []}', 400, "messages"),
    (b'{"model": "policy", "messages": [{"role": "robot", "content": "hi"}]}', 400, "role"),
    (b'{"model": "policy", "messages": [{"role": "user", "content": "hi"}], "n": 0}', 400, "n:"),
    (b'{"model": "policy", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}', 400, "temperature"),
    (b'{"model": "policy", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}', 400, "bogus"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "unknown model"),
    (CHAT.encode(), 503, "unreachable"),
])
def test_bad_requests_get_json_errors(gateway, body, status, needle):
    resp = httpx.post(f"{gateway}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert needle in _is_error(resp, status)["message"]


def test_completion_route_checks_prompt(gateway):
    resp = httpx.post(f"{gateway}/v1/completions", json={"model": "base"})
    assert "prompt" in _is_error(resp, 400)["message"]
    resp = httpx.post(f"{gateway}/v1/completions", json={"model": "base", "prompt": ""})
    assert "prompt" in _is_error(resp, 400)["message"]
    resp = httpx.post(f"{gateway}/v1/completions", json={"model": "base", "prompt": "hi", "echo": True, "logprobs": 0})
    assert "prompt log-probabilities" in _is_error(resp, 400)["message"]
    counted = httpx.get(f"{gateway}/metrics").text
    assert 'odpo_gateway_requests_total{alias="-",route="/v1/completions",status="400"}' in counted
    assert 'odpo_gateway_request_seconds_count{alias="-",route="/v1/completions",status="400"}' in counted


@pytest.mark.parametrize("body, status, needle", [
    ({"response_id": "x"}, 400, "either `rating`"),
    ({"response_id": "x", "rating": 2}, 400, "rating"),
    ({"response_id": "x", "rating": 1, "preferred": "this"}, 400, "needs `other_response_id`"),
    ({"response_id": "x", "other_response_id": "y"}, 400, "`preferred` is required"),
    ({"response_id": "x", "other_response_id": "x", "preferred": "this"}, 400, "two different"),
    ({"response_id": "", "rating": 1}, 400, "response_id"),
    ({"response_id": "chatcmpl-unknown", "rating": 1}, 404, "unknown response id"),
    ({"response_id": "chatcmpl-unknown", "other_response_id": "b", "preferred": "other"}, 404, "unknown response"),
])
def test_feedback_is_validated(gateway, body, status, needle):
    assert needle in _is_error(httpx.post(f"{gateway}/v1/feedback", json=body), status)["message"]


@pytest.mark.parametrize("body, status, needle", [
    ({}, 400, "prompts: Field required"),
    ({"prompts": []}, 400, "prompts"),
    ({"prompts": [{"text": "hi", "messages": [{"role": "user", "content": "hi"}]}]}, 400, "exactly one"),
    ({"prompts": [{"messages": [{"role": "assistant", "content": "hi"}]}]}, 400, "last message"),
    ({"prompts": [{"text": "   "}]}, 400, "blank"),
    ({"prompts": [{"text": "x" * 300_000}]}, 400, "at most"),
    ({"prompts": [{"text": "Describe snow.", "task": {"kind": "constraints", "constraints": []}}]}, 503, "broker"),
])
def test_prompts_are_validated(gateway, body, status, needle):
    resp = httpx.post(f"{gateway}/v1/prompts", json=body, timeout=30)
    assert needle in _is_error(resp, status)["message"]


def test_the_gateway_has_no_admin_api(gateway):
    """Admin lives on the gate only: the gateway answers 404 with a JSON body, whatever token is sent."""
    for method, path, body in ADMIN_ROUTES:
        resp = httpx.request(method, f"{gateway}{path}", json=body, headers={"authorization": f"Bearer {TOKEN}"})
        _is_error(resp, 404)


def _gate_settings(**kw) -> GateSettings:
    """A gate whose engine is down (nothing listens there) and that promotes nothing by itself."""
    return GateSettings(vllm_url=f"http://127.0.0.1:{free_port()}", **kw)


def test_the_gate_admin_is_off_without_a_token(broker):
    with running_gate(_gate_settings(), CommonSettings(bootstrap_servers=broker.bootstrap), promote=False) as url:
        for method, path, body in ADMIN_ROUTES:
            _is_error(httpx.request(method, f"{url}{path}", json=body, headers={"authorization": f"Bearer {TOKEN}"}),
                      404)


@pytest.mark.parametrize("source", ["env", "file"])
def test_the_gate_admin_refuses_missing_or_wrong_tokens(broker, tmp_path, source, monkeypatch):
    if source == "env":
        monkeypatch.setenv("ODPO_GATE_ADMIN_TOKEN", TOKEN)
        settings = _gate_settings()
    else:  # a Kubernetes Secret mount: the file's content (a trailing newline is ignored)
        (tmp_path / "token").write_text(TOKEN + "\n")
        settings = _gate_settings(admin_token_file=tmp_path / "token")
    with running_gate(settings, CommonSettings(bootstrap_servers=broker.bootstrap), promote=False) as url:
        for method, path, body in ADMIN_ROUTES:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"},
                            {"authorization": f"Bearer {TOKEN}x"}, {"authorization": "Bearer"}):
                resp = httpx.request(method, f"{url}{path}", json=body, headers=headers)
                assert _is_error(resp, 401)["type"] == "authentication_error"
                assert resp.headers["www-authenticate"] == "Bearer"
        ok = httpx.get(f"{url}/admin/versions", headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["promoted"] == 0
        assert ok.json()["versions"][0]["name"] == "base" and ok.json()["control"]["writing"] is True
        nothing = httpx.post(f"{url}/admin/rollback", headers={"authorization": f"Bearer {TOKEN}"})
        assert "nothing to roll back" in _is_error(nothing, 409)["message"]
        unknown = httpx.post(f"{url}/admin/promote", json={"version": 5}, headers={"authorization": f"Bearer {TOKEN}"})
        assert "unknown version" in _is_error(unknown, 404)["message"]


def test_a_gate_without_its_broker_is_not_ready_and_makes_no_change():
    """No broker: the gate cannot read the control topic, so it does not write the registry: /readyz is a JSON
    503, reads answer from its registry file, changes are refused with 503 and Retry-After (never made where no
    gateway could learn of them)."""
    settings = _gate_settings(admin_token=TOKEN)
    common = CommonSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    auth = {"authorization": f"Bearer {TOKEN}"}
    with running_gate(settings, common, promote=False, ready=False) as url:
        assert "reading the control topic" in _is_error(httpx.get(f"{url}/readyz", timeout=10), 503)["message"]
        assert httpx.get(f"{url}/admin/versions", headers=auth).json()["promoted"] == 0
        for method, path, body in ADMIN_ROUTES[1:]:
            resp = httpx.request(method, f"{url}{path}", json=body, headers=auth, timeout=30)
            assert "the gate is starting" in _is_error(resp, 503)["message"]
            assert int(resp.headers["retry-after"]) > 0
        assert "odpo_gate_writing 0.0" in httpx.get(f"{url}/metrics").text


def test_the_gateway_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys; from service.gateway import create_app; from core.settings import GatewaySettings; "
            "create_app(GatewaySettings()); "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_request_ids_and_the_access_log(gateway, caplog):
    """Every answer carries an x-request-id (the client's when it is a plain token, else a new one), and each
    request is one access-log line with it; JSON log lines carry the same fields."""
    import json
    import logging

    from core.runtime import JsonLines

    caplog.set_level(logging.INFO, logger="odpo.access")
    mine = httpx.post(f"{gateway}/v1/chat/completions", content=CHAT, headers={"x-request-id": "client-42.a_b",
                                                                                "content-type": "application/json"})
    assert mine.headers["x-request-id"] == "client-42.a_b"
    for bad in ("has space", "x" * 129, "quote\""):
        other = httpx.post(f"{gateway}/v1/chat/completions", content=CHAT, headers={"x-request-id": bad,
                                                                                    "content-type": "application/json"})
        assert other.headers["x-request-id"] != bad and len(other.headers["x-request-id"]) == 32
    deadline = time.monotonic() + 5
    while not (lines := [r for r in caplog.records if getattr(r, "request_id", None) == "client-42.a_b"]):
        assert time.monotonic() < deadline, "no access-log line for the request"
        time.sleep(0.05)
    line = json.loads(JsonLines("gateway").format(lines[0]))
    assert {k: line[k] for k in ("request_id", "method", "path", "status", "component", "logger")} == {
        "request_id": "client-42.a_b", "method": "POST", "path": "/v1/chat/completions", "status": mine.status_code,
        "component": "gateway", "logger": "odpo.access"}
    assert line["duration_ms"] >= 0 and line["level"] == "INFO" and line["ts"].endswith("Z")
