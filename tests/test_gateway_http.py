"""The gateway over real HTTP (uvicorn on a free port): errors are JSON, never tracebacks."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from service.broker import free_port
from service.gateway import create_app
from service.settings import GatewaySettings


@pytest.fixture()
def gateway():
    """A gateway whose serving engine is down (nothing listens on its vLLM port)."""
    port = free_port()
    settings = GatewaySettings(port=port, vllm_url=f"http://127.0.0.1:{free_port()}")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _is_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["message"]
    return body["error"]


def test_health_ready_and_metrics(gateway):
    assert httpx.get(f"{gateway}/healthz").json() == {"status": "ok"}
    assert "unreachable" in _is_error(httpx.get(f"{gateway}/readyz"), 503)["message"]
    metrics = httpx.get(f"{gateway}/metrics").text
    assert "odpo_gateway_requests_total" in metrics


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"messages": []}', 400, "`model` is required"),
    (b'{"model": "policy"}', 400, "messages"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "unknown model"),
    (b'{"model": "policy", "messages": [{"role": "user", "content": "hi"}]}', 503, "unreachable"),
])
def test_bad_requests_get_json_errors(gateway, body, status, needle):
    resp = httpx.post(f"{gateway}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert needle in _is_error(resp, status)["message"]


def test_completion_route_checks_prompt(gateway):
    resp = httpx.post(f"{gateway}/v1/completions", json={"model": "base"})
    assert "prompt" in _is_error(resp, 400)["message"]
    counted = httpx.get(f"{gateway}/metrics").text
    assert 'odpo_gateway_requests_total{alias="base",route="/v1/completions",status="400"}' in counted
