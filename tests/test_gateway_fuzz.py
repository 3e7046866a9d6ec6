"""Schemathesis fuzzing of the gateway's OpenAPI spec against the real vLLM: no 5xx, no crash.

Every operation of the spec gets generated requests, valid ones (positive)
and invalid ones (negative). So that valid completions really reach the
engine instead of all failing on a random model name, a share of cases is
pointed at `policy`/`base`, a share of feedback cases at responses the
gateway really served, and token budgets are capped at 2 (the spec allows
more; the cap only keeps a CPU run short). Admin routes get the token.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis import GenerationMode

from core.broker import EmbeddedBroker
from core.bus import ensure_topics
from core.settings import CommonSettings, GatewaySettings
from tests.gateway_server import register_base, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

TOKEN = "fuzz-token"  # sent with every case: the gateway has no admin API (the gate has), it must ignore it
EXAMPLES = {"POST /v1/chat/completions": 60, "POST /v1/completions": 60, "POST /v1/feedback": 40,
            "POST /v1/prompts": 40}
DEFAULT_EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzzed(vllm_server, model_dir, vllm_store):
    register_base(vllm_server.url, model_dir, vllm_store)
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap)
        settings = GatewaySettings(vllm_url=vllm_server.url, mirror_fraction=1.0,
                                   request_timeout_s=120)
        common = CommonSettings(bootstrap_servers=broker.bootstrap, store_dir=vllm_store)
        with running_gateway(settings, common) as url:
            yield url


def _served_ids(url: str) -> list[str]:
    """Ids of real responses (two choices of one prompt), for feedback cases to name."""
    resp = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "base", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "n": 2,
        "temperature": 1.0, "seed": 1})
    assert resp.status_code == 200, resp.text
    rid = resp.json()["id"]
    return [rid, f"{rid}:1"]


def _steer(case, served: list[str]) -> None:
    """Point part of the generated cases at what exists, and cap the token budgets."""
    body = case.body
    if not isinstance(body, dict):
        return
    pick = int(hashlib.sha256(repr(sorted(body, key=str)).encode() + repr(body).encode()).hexdigest(), 16)
    if case.path in ("/v1/chat/completions", "/v1/completions"):
        if pick % 3 and isinstance(body.get("model"), str):
            body["model"] = ("policy", "base")[pick % 2]
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
                body[key] = min(value, 2)  # 2.0 stays a float: the gateway must take integral floats too
        if body.get("max_tokens") is None:  # absent or null: the engine's default, up to the context length
            body["max_tokens"] = 2
    elif case.path == "/v1/prompts" and isinstance(body.get("prompts"), list) and pick % 2:
        for p in body["prompts"]:  # the one-form and last-turn rules are not in the schema
            if isinstance(p, dict):
                p.pop("messages", None)
                p.pop("task", None)  # a client's task must be of an allowed kind; none is always fine
                p["text"] = p.get("text") if isinstance(p.get("text"), str) and p["text"].strip() else "Say hi."
    elif case.path == "/v1/feedback" and pick % 2:
        for key in ("response_id", "other_response_id"):
            if isinstance(body.get(key), str):
                body[key] = served[(pick >> 1) % 2] if key == "response_id" else served[(pick >> 2) % 2]


def test_no_server_errors_on_generated_requests(fuzzed):
    url = fuzzed
    served = _served_ids(url)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    per_operation: dict[str, Counter[int]] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.body else [])
        for mode in modes:
            _fuzz(op, mode, url, served, per_operation.setdefault(f"{op.method.upper()} {op.path}", Counter()),
                  failures)
    statuses = sum(per_operation.values(), Counter())
    total = sum(statuses.values())
    print(f"fuzz: {total} requests, statuses {dict(sorted(statuses.items()))}")
    for label, counts in per_operation.items():
        print(f"  {label}: {dict(sorted(counts.items()))}")
    assert not failures, "\n".join(failures[:10])
    assert total >= 300 and statuses[200] >= 60 and statuses[202] >= 5, statuses
    assert httpx.get(f"{url}/healthz").status_code == 200, "the gateway survived"
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200, "and so did the engine behind it"


def _fuzz(op, mode: GenerationMode, url: str, served: list[str], statuses: Counter, failures: list[str]) -> None:
    """Send generated requests for one operation: 5xx are collected, other errors must be JSON error bodies."""
    label = f"{op.method.upper()} {op.path} {mode.value}"

    @given(case=op.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=EXAMPLES.get(label.rsplit(" ", 1)[0], DEFAULT_EXAMPLES), deadline=None,
                         database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))
    def run(case):
        _steer(case, served)
        resp = case.call(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=120)
        statuses[resp.status_code] += 1
        if resp.status_code >= 500:
            failures.append(f"{label}: {resp.status_code} {resp.text[:300]} for {case.body!r}")
        elif resp.status_code >= 400:
            content_type = resp.headers.get("content-type") or [""]  # schemathesis: a list per header
            assert content_type[0].startswith("application/json"), resp.text
            assert resp.json()["error"]["message"], resp.text

    run()
