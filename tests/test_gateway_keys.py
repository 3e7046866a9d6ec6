"""Client API keys on the gateway (ODPO_GATEWAY_API_KEYS_FILE), over real HTTP.

Auth, scopes, rates and quotas are answered before any engine is asked, so
most of this runs with the engine (and the broker) down: a request that gets
past the key is a 503 (engine unreachable), one that does not is a 401, 403
or 429 with a JSON body. The feedback caps need a served response: a fake
engine (tests/fake_engine.py) answers, and feedback goes to a broker of its
own. No vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import httpx
import pytest

from core.broker import free_port
from core.settings import CommonSettings, GatewaySettings
from service.gateway.keys import ApiKey, FeedbackCaps, KeyFileError, KeyLimits, parse_keys
from tests.fake_engine import running_fake_engine
from tests.gateway_server import running_gateway

FULL, INFER, SLOW, DAILY = ("full-key-0123456789abcdef", "infer-key-0123456789abcdef",
                            "slow-key-0123456789abcdef", "daily-key-0123456789abcdef")
ROTATED = "full-key-rotated-0123456789"
CHAT = {"model": "policy", "messages": [{"role": "user", "content": "hi"}]}


def _keys(full: str = FULL) -> list[dict]:
    return [{"id": "full", "key": full, "scopes": ["inference", "feedback", "prompts"]},
            {"id": "infer", "sha256": hashlib.sha256(INFER.encode()).hexdigest(), "scopes": ["inference"]},
            {"id": "slow", "key": SLOW, "rate_per_s": 0.001, "burst": 2},
            {"id": "daily", "key": DAILY, "daily_quota": 3}]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(json.dumps(_keys()))
    return path


@pytest.fixture(scope="module")
def gateway(keys_file):
    settings = GatewaySettings(vllm_url=f"http://127.0.0.1:{free_port()}", publish_timeout_s=2,
                               api_keys_file=keys_file, api_keys_check_s=0.1)
    with running_gateway(settings, CommonSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")) as url:
        yield url


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["message"] and body["type"] and body["code"]
    return body


def test_probes_and_metrics_need_no_key(gateway):
    assert httpx.get(f"{gateway}/healthz").status_code == 200
    assert httpx.get(f"{gateway}/metrics").status_code == 200
    assert httpx.get(f"{gateway}/readyz", timeout=10).status_code == 503  # not ready (engine down), not 401


@pytest.mark.parametrize("headers", [{}, _auth("wrong-key-0123456789abcdef"), {"authorization": f"Basic {FULL}"},
                                     {"authorization": "Bearer"}])
def test_a_missing_or_wrong_key_is_401(gateway, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/feedback"),
                         ("POST", "/v1/prompts"), ("GET", "/v1/nothing-here")):
        resp = httpx.request(method, f"{gateway}{path}", json=CHAT, headers=headers, timeout=10)
        assert _error(resp, 401)["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"


def test_the_key_is_checked_before_the_body_is_read(gateway):
    resp = httpx.post(f"{gateway}/v1/chat/completions", content=b"x" * (4 << 20), timeout=30)
    _error(resp, 401)


def test_a_key_reaches_its_scopes_only(gateway):
    assert httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, headers=_auth(INFER), timeout=10).status_code == 503
    prompts = {"prompts": [{"text": "Describe snow."}]}
    assert _error(httpx.post(f"{gateway}/v1/prompts", json=prompts, headers=_auth(INFER)), 403)["type"] == \
        "permission_error"
    _error(httpx.post(f"{gateway}/v1/feedback", json={"response_id": "x", "rating": 1}, headers=_auth(INFER)), 403)
    # the full key gets past the key checks: the broker (down) and the unknown id answer
    _error(httpx.post(f"{gateway}/v1/prompts", json=prompts, headers=_auth(FULL), timeout=30), 503)
    _error(httpx.post(f"{gateway}/v1/feedback", json={"response_id": "x", "rating": 1}, headers=_auth(FULL),
                      timeout=30), 404)


def test_rate_and_daily_quota_answer_429_with_retry_after(gateway):
    statuses = [httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, headers=_auth(SLOW), timeout=10)
                for _ in range(3)]
    assert [r.status_code for r in statuses] == [503, 503, 429]
    assert _error(statuses[2], 429)["code"] == "rate_limit_exceeded"
    assert int(statuses[2].headers["retry-after"]) >= 1
    statuses = [httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, headers=_auth(DAILY), timeout=10)
                for _ in range(4)]
    assert [r.status_code for r in statuses] == [503, 503, 503, 429]
    assert _error(statuses[3], 429)["code"] == "quota_exceeded"
    assert 1 <= int(statuses[3].headers["retry-after"]) <= 86400
    assert httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, headers=_auth(FULL),
                      timeout=10).status_code == 503  # other keys are not held back


def test_metrics_and_access_log_carry_the_key_id_never_the_key(gateway, caplog):
    from core.runtime import JsonLines

    caplog.set_level(logging.INFO, logger="odpo.access")
    httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, headers={**_auth(FULL), "x-request-id": "keyed-1"})
    httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, headers={"x-request-id": "keyless-1"})
    deadline = time.monotonic() + 5
    while not {"keyed-1", "keyless-1"} <= {getattr(r, "request_id", None) for r in caplog.records}:
        assert time.monotonic() < deadline, "no access-log lines"
        time.sleep(0.05)
    lines = {r.request_id: json.loads(JsonLines("gateway").format(r)) for r in caplog.records
             if getattr(r, "request_id", None) in ("keyed-1", "keyless-1")}
    assert lines["keyed-1"]["key_id"] == "full" and lines["keyed-1"]["status"] == 503
    assert lines["keyless-1"]["status"] == 401 and lines["keyless-1"].get("key_id") is None
    text = httpx.get(f"{gateway}/metrics").text
    assert 'odpo_gateway_key_requests_total{key="full",status="503"}' in text
    assert 'odpo_gateway_key_refusals_total{key="-",reason="unauthenticated"}' in text
    assert 'odpo_gateway_key_refusals_total{key="infer",reason="forbidden"}' in text
    assert all(k not in text and k not in caplog.text for k in (FULL, INFER, SLOW, DAILY))


def test_a_rotated_key_file_applies_without_a_restart(gateway, keys_file):
    keys_file.write_text("not: [valid")  # a broken file: the keys read last stay in force
    time.sleep(0.3)
    assert httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, headers=_auth(FULL), timeout=10).status_code == 503
    keys_file.write_text(json.dumps(_keys(full=ROTATED)))
    deadline = time.monotonic() + 5
    while httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, headers=_auth(FULL), timeout=10).status_code != 401:
        assert time.monotonic() < deadline, "the old key still works"
        time.sleep(0.1)
    assert httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, headers=_auth(ROTATED),
                      timeout=10).status_code == 503
    keys_file.write_text(json.dumps(_keys()))


@pytest.mark.parametrize("entries, needle", [
    ([{"id": "a", "key": FULL, "sha256": "0" * 64}], "exactly one"),
    ([{"id": "a"}], "exactly one"),
    ([{"id": "a", "key": "short"}], "at least 16"),
    ([{"id": "a", "key": FULL}, {"id": "a", "key": INFER}], "twice"),
    ([{"id": "a", "key": FULL}, {"id": "b", "key": FULL}], "same key"),
    ([{"id": "a", "key": FULL, "scopes": ["admin"]}], "scopes"),
    ([{"id": "a b", "key": FULL}], "id"),
    ([{"id": "a", "key": FULL, "bogus": 1}], "bogus"),
    ({"id": "a"}, "list of keys"),
])
def test_bad_key_files_are_refused(entries, needle):
    with pytest.raises(KeyFileError, match=needle):
        parse_keys(json.dumps(entries))


def test_bad_key_file_at_start_fails_the_gateway(tmp_path):
    from service.gateway import create_app

    (tmp_path / "keys.json").write_text("[{}]")
    with pytest.raises(KeyFileError):
        create_app(GatewaySettings(api_keys_file=tmp_path / "keys.json"))
    with pytest.raises(KeyFileError, match="cannot read"):
        create_app(GatewaySettings(api_keys_file=tmp_path / "absent.json"))


def test_token_bucket_and_daily_quota():
    key = ApiKey("k", b"", frozenset(), rate_per_s=1.0, burst=2.0, daily_quota=4)
    limits = KeyLimits()
    t = 86400.0 * 100 + 10
    assert limits.admit(key, t) is None and limits.admit(key, t) is None
    reason, wait = limits.admit(key, t)
    assert reason == "rate" and wait == pytest.approx(1.0)
    assert limits.admit(key, t + 1.0) is None
    assert limits.admit(key, t + 3.0) is None  # the 4th of the day
    reason, wait = limits.admit(key, t + 10.0)
    assert reason == "daily_quota" and wait == pytest.approx(86400 - 20)
    assert limits.admit(key, 86400.0 * 101 + 1) is None  # a new UTC day


def test_feedback_caps_per_response_and_per_hour():
    key = ApiKey("k", b"", frozenset(), feedback_per_hour=2, feedback_per_response=1)
    caps = FeedbackCaps()
    assert caps.reserve(key, ["a"], now=1000.0) is None
    assert caps.reserve(key, ["a"], now=1001.0)[0] == 409
    assert caps.reserve(ApiKey("other", b"", frozenset()), ["a"], now=1001.0) is None  # per key
    caps.release(key, ["a"])  # not published after all: may be sent again
    assert caps.reserve(key, ["a"], now=1002.0) is None
    assert caps.reserve(key, ["b"], now=1003.0) is None
    status, _, wait = caps.reserve(key, ["c"], now=1004.0)  # a third in the hour
    assert status == 429 and wait == pytest.approx(3600 - 2)
    assert caps.reserve(key, ["c"], now=1002.0 + 3601) is None


@pytest.fixture(scope="module")
def feedback_gateway(own_broker, tmp_path_factory):
    path = tmp_path_factory.mktemp("fbkeys") / "keys.json"
    path.write_text(json.dumps([{"id": "rater", "key": FULL, "scopes": ["inference", "feedback"],
                                 "feedback_per_hour": 3}]))
    with running_fake_engine(["base"]) as (engine_url, _):
        settings = GatewaySettings(vllm_url=engine_url, api_keys_file=path)
        with running_gateway(settings, CommonSettings(bootstrap_servers=own_broker.bootstrap)) as url:
            yield url


def _served_id(url: str) -> str:
    resp = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=_auth(FULL), timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def test_one_feedback_per_response_and_key_then_409_and_an_hourly_cap(feedback_gateway):
    url = feedback_gateway
    first, second, third = _served_id(url), _served_id(url), _served_id(url)
    rate = lambda rid: httpx.post(f"{url}/v1/feedback", json={"response_id": rid, "rating": 1},  # noqa: E731
                                  headers=_auth(FULL), timeout=30)
    assert rate(first).status_code == 202
    assert _error(rate(first), 409)["code"] == "feedback_exists"
    assert rate(second).status_code == 202 and rate(third).status_code == 202
    fourth = _served_id(url)
    capped = rate(fourth)
    assert _error(capped, 429)["code"] == "feedback_rate_exceeded"
    assert 3000 < int(capped.headers["retry-after"]) <= 3600
    text = httpx.get(f"{url}/metrics").text
    assert 'odpo_gateway_key_refusals_total{key="rater",reason="feedback_per_response"}' in text
