"""The gateway's set of serving engines: parsing, round-robin, skipping a down engine, and pods that leave."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from service.gateway import endpoints
from service.gateway.endpoints import EnginePool, engine_urls, expand_dns
from service.gateway.metrics import ENGINE_REQUESTS


def up(url: str) -> float | None:
    return REGISTRY.get_sample_value("odpo_gateway_engine_up", {"engine": url})


def test_engine_urls_are_split_trimmed_and_deduplicated():
    assert engine_urls(" http://a:8000/, http://b:8000,http://a:8000 ,") == ["http://a:8000", "http://b:8000"]
    with pytest.raises(ValueError, match="names no serving engine"):
        engine_urls(" , ")


def test_a_name_stands_for_each_of_its_addresses_and_an_unknown_one_for_itself():
    urls = expand_dns("http://localhost:8000/v1")
    assert "http://127.0.0.1:8000/v1" in urls and all(u.endswith(":8000/v1") for u in urls)
    assert expand_dns("http://no-such-engine.invalid:8000") == ["http://no-such-engine.invalid:8000"]


def test_round_robin_skips_a_down_engine_until_its_time_is_up(monkeypatch):
    pool = EnginePool(["http://a", "http://b", "http://c"], down_s=30)
    firsts = [pool.rotation()[0] for _ in range(6)]
    assert sorted(firsts) == ["http://a", "http://a", "http://b", "http://b", "http://c", "http://c"]
    assert pool.rotation() == ["http://a", "http://b", "http://c"]  # each turn tries the others after it
    pool.mark_down("http://b", "connection refused")
    assert up("http://b") == 0 and pool.routable() == ["http://a", "http://c"]
    pool.mark_down("http://a", "connection refused")
    pool.mark_down("http://c", "connection refused")
    assert pool.routable() == ["http://a", "http://b", "http://c"], "all down: try them all anyway"
    pool.mark_up("http://b")
    assert up("http://b") == 1 and pool.routable() == ["http://b"]
    now = endpoints.time.monotonic()
    monkeypatch.setattr(endpoints.time, "monotonic", lambda: now + 31)
    assert pool.routable() == ["http://a", "http://b", "http://c"], "tried again after down_s"


def test_an_engine_that_leaves_the_dns_answer_takes_its_series_with_it(monkeypatch):
    # Kubernetes DNS (a headless Service's pod addresses) does not exist here: the answers are given.
    answers = {"http://engines:8000": ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]}
    monkeypatch.setattr(endpoints, "expand_dns", lambda url: answers[url])
    pool = EnginePool(["http://engines:8000"], resolve_dns=True, dns_refresh_s=0)
    assert pool.urls() == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    pool.mark_up("http://10.0.0.1:8000")
    pool.mark_down("http://10.0.0.2:8000", "connection refused")
    ENGINE_REQUESTS.labels("http://10.0.0.2:8000").inc()
    answers["http://engines:8000"] = ["http://10.0.0.1:8000", "http://10.0.0.3:8000"]  # pod 2 replaced by pod 3
    assert pool.urls() == ["http://10.0.0.1:8000", "http://10.0.0.3:8000"]
    assert up("http://10.0.0.2:8000") is None and up("http://10.0.0.1:8000") == 1
    assert REGISTRY.get_sample_value("odpo_gateway_engine_requests_total", {"engine": "http://10.0.0.2:8000"}) is None
    assert pool.index("http://10.0.0.3:8000") == 1 and pool.index("http://10.0.0.2:8000") == -1
    answers["http://engines:8000"] = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]  # an address reused
    assert pool.routable() == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"], "its old down mark is gone"
