"""The gateway over real HTTP (uvicorn on a free port) with its engine and broker down.

Errors are OpenAI-shaped JSON, never tracebacks; bad input is a 4xx; the
admin API refuses missing or wrong tokens and is absent without one.
"""

from __future__ import annotations

import time

import httpx
import pytest

from core.broker import free_port
from core.settings import CommonSettings, GatewaySettings
from tests.gateway_server import running_gateway

TOKEN = "s3cret-admin-token"
ADMIN_ROUTES = [("GET", "/admin/versions", None), ("POST", "/admin/promote", {"version": 0}),
                ("POST", "/admin/pin", {}), ("POST", "/admin/unpin", None), ("POST", "/admin/rollback", None)]


def _down_settings(**kw) -> tuple[GatewaySettings, CommonSettings]:
    """Nothing listens on the engine's or the broker's port; one replica alone (no control plane), unless
    `control_plane=True`."""
    kw.setdefault("control_plane", False)
    return (GatewaySettings(vllm_url=f"http://127.0.0.1:{free_port()}", publish_timeout_s=2, **kw),
            CommonSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"))


@pytest.fixture(scope="module")
def gateway():
    with running_gateway(*_down_settings(), gate=False) as url:
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


def test_admin_is_off_without_a_token(gateway):
    for method, path, body in ADMIN_ROUTES:
        resp = httpx.request(method, f"{gateway}{path}", json=body, headers={"authorization": f"Bearer {TOKEN}"})
        _is_error(resp, 404)


@pytest.mark.parametrize("source", ["env", "file"])
def test_admin_refuses_missing_or_wrong_tokens(tmp_path, source, monkeypatch):
    if source == "env":
        monkeypatch.setenv("ODPO_GATEWAY_ADMIN_TOKEN", TOKEN)
        settings, common = _down_settings()
    else:  # a Kubernetes Secret mount: the file's content (a trailing newline is ignored)
        (tmp_path / "token").write_text(TOKEN + "\n")
        settings, common = _down_settings(admin_token_file=tmp_path / "token")
    with running_gateway(settings, common, gate=False) as url:
        for method, path, body in ADMIN_ROUTES:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"},
                            {"authorization": f"Bearer {TOKEN}x"}, {"authorization": "Bearer"}):
                resp = httpx.request(method, f"{url}{path}", json=body, headers=headers)
                assert _is_error(resp, 401)["type"] == "authentication_error"
                assert resp.headers["www-authenticate"] == "Bearer"
        ok = httpx.get(f"{url}/admin/versions", headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["promoted"] == 0
        assert ok.json()["versions"][0]["name"] == "base"
        nothing = httpx.post(f"{url}/admin/rollback", headers={"authorization": f"Bearer {TOKEN}"})
        assert "nothing to roll back" in _is_error(nothing, 409)["message"]
        unknown = httpx.post(f"{url}/admin/promote", json={"version": 5}, headers={"authorization": f"Bearer {TOKEN}"})
        assert "unknown version" in _is_error(unknown, 404)["message"]


def test_admin_changes_without_a_leader_are_503_with_retry_after():
    """With the control plane on and no broker, no replica leads: reads answer from the local registry,
    changes are refused with a JSON 503 and Retry-After (never made on one replica alone), once they have
    waited twice the session timeout for a leader."""
    settings, common = _down_settings(control_plane=True, admin_token=TOKEN, leader_session_timeout_s=1)
    auth = {"authorization": f"Bearer {TOKEN}"}
    with running_gateway(settings, common, gate=False) as url:
        assert httpx.get(f"{url}/admin/versions", headers=auth).json()["promoted"] == 0
        leader = httpx.get(f"{url}/admin/leader", headers=auth).json()
        assert leader["control_plane"] is True and leader["leading"] is False and leader["leader_url"] is None
        for method, path, body in ADMIN_ROUTES[1:]:
            started = time.monotonic()
            resp = httpx.request(method, f"{url}{path}", json=body, headers=auth, timeout=30)
            assert 1.9 < time.monotonic() - started < 10
            assert "no gateway replica leads" in _is_error(resp, 503)["message"]
            assert int(resp.headers["retry-after"]) > 0
        assert "odpo_gateway_leader 0.0" in httpx.get(f"{url}/metrics").text


def test_the_gateway_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys; from service.gateway import create_app; from core.settings import GatewaySettings; "
            "create_app(GatewaySettings()); import judge.evaluate, judge.signals, service.gateway.verdict; "  # the gate's scoring (fluency loads torch only when it scores)
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
