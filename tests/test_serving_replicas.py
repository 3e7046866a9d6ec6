"""Two vLLM replicas behind one gateway (and the gate): every replica serves every version it may be asked for.

Short version of benchmarks/serving_replicas.py (two generators, ten versions). Here: the session's vLLM
(with the adapter store's LoRA resolver) and a second vLLM started without it, as an operator's own vLLM
would be. The gateway routes to both. A version the gate promotes is loaded into both before it is
scored; a version only announced in the store is served through either (the resolver, or the gateway
loading it into the replica that answered 404); both replicas give the same greedy answers; when one
replica dies, requests go to the other.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from generator.server import VllmServer
from core.bus import make_producer, publish
from core.contracts import TOPIC_ADAPTERS, version_name
from core.settings import CommonSettings, GateSettings, GatewaySettings, GeneratorSettings
from tests.gateway_server import noisy_adapter, register_base, running_loop

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

# Names no other test of the session uses. (The gate also takes the store's newest announced version and
# scores the newest pending one: tests announce through the `announce` fixture, which removes them after.)
PROMOTED, ANNOUNCED = 9901, 9902
PROBE = [{"role": "user", "content": "Name two things you can do at a lake."}]
OPEN_GATE = dict(heldout_prompts=4, heldout_prompts_max=4, eval_max_tokens=8, promotion_tolerance=1.0,
                 reference_logprob=False, load_wait_s=0, limit_mean_words=1, limit_empty_share=1,
                 limit_distinct2=1, limit_on_topic_share=1, limit_ref_logprob=100)


@pytest.fixture(scope="module")
def plain_vllm(model_dir, vllm_store, tmp_path_factory):
    """A second vLLM replica without the store resolver (it knows only what it is told to load)."""
    server = VllmServer(model_dir, GeneratorSettings(vllm_port=0, startup_timeout_s=400),
                        log_file=tmp_path_factory.mktemp("vllm-plain") / "vllm.log").start()
    register_base(server.url, model_dir, vllm_store)
    yield server
    server.stop()


def _ask(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": PROBE, "max_tokens": 12, "temperature": 0})


def _listed(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}


def _answers(gateway: str, model: str, n: int) -> dict[str, set[str]]:
    """`n` greedy answers through the gateway, grouped by the engine that gave them; all must succeed."""
    by_engine: dict[str, set[str]] = {}
    for _ in range(n):
        resp = _ask(gateway, model)
        assert resp.status_code == 200, resp.text
        if model != "policy":
            assert resp.json()["model"] == model
        by_engine.setdefault(resp.headers["x-odpo-engine"], set()).add(resp.json()["choices"][0]["message"]["content"])
    return by_engine


def test_two_replicas_serve_every_version(vllm_server, plain_vllm, own_broker, model_dir, vllm_store, announce):
    register_base(vllm_server.url, model_dir, vllm_store)
    engines = [vllm_server.url, plain_vllm.url]
    gate = GateSettings(vllm_url=",".join(engines), **OPEN_GATE)
    common = CommonSettings(bootstrap_servers=own_broker.bootstrap, store_dir=vllm_store)
    with running_loop(gate, GatewaySettings(vllm_url=",".join(engines)), common) as (gateway, _):
        # the gate promotes a published version only after loading it into both replicas
        ready = noisy_adapter(vllm_store, model_dir, PROMOTED, scale=0.02, seed=11)
        announce(ready)
        producer = make_producer(own_broker.bootstrap)
        publish(producer, TOPIC_ADAPTERS, version_name(PROMOTED), ready)
        producer.close()
        deadline = time.monotonic() + 300
        while httpx.get(f"{gateway}/readyz", timeout=30).json().get("policy_version") != PROMOTED:
            assert time.monotonic() < deadline, "the gate did not promote the version"
            time.sleep(0.5)
        assert all(version_name(PROMOTED) in _listed(u) for u in engines)

        # `policy` and `policy-v<N>` through the gateway: every request answered, by both replicas, alike
        for model in ("policy", version_name(PROMOTED)):
            by_engine = _answers(gateway, model, 6)
            assert set(by_engine) == {"0", "1"}, by_engine
            assert by_engine["0"] == by_engine["1"] and len(by_engine["0"]) == 1, by_engine
            print(f"{model}: both replicas answer {next(iter(by_engine['0']))!r}")

        # a version only announced in the store: the resolver serves it on one replica, the gateway loads it
        # into the other when that one answers 404
        announced = noisy_adapter(vllm_store, model_dir, ANNOUNCED, scale=0.05, seed=12)
        announce(announced)
        assert _ask(plain_vllm.url, version_name(ANNOUNCED)).status_code == 404
        by_engine = _answers(gateway, version_name(ANNOUNCED), 4)
        assert set(by_engine) == {"0", "1"} and by_engine["0"] == by_engine["1"], by_engine
        assert by_engine["0"] != _answers(gateway, version_name(PROMOTED), 2).popitem()[1]

        # one replica dies: requests go to the other, none fails
        plain_vllm.stop()
        served = Counter()
        for _ in range(6):
            resp = _ask(gateway, "policy")
            assert resp.status_code == 200, resp.text
            served[resp.headers["x-odpo-engine"]] += 1
        assert served == {"0": 6}
        assert httpx.get(f"{gateway}/readyz", timeout=30).status_code == 200
        metrics = httpx.get(f"{gateway}/metrics").text
        assert f'odpo_gateway_engine_up{{engine="{plain_vllm.url}"}} 0.0' in metrics
