"""The promotion gate on the real vLLM: a sound version is promoted, a wrecked one is not, rollback works.

The gate (`odpo gate`'s app) reads `odpo.adapters` on its own Tansu broker, scores `base` and
every published version on held-out prompts (greedy answers from vLLM, the
verifier judge), and loads versions into vLLM itself (no generator runs here;
`load_wait_s=0`). A deliberately wrecked adapter (large LoRA weights that
make it answer nothing; see `silent_adapter` for why not random ones) is
refused and `policy` stays on the promoted version (as the gateway, which
reads the gate's decisions from the control topic, serves it); an operator's forced
promotion of it is undone by a rollback, which returns traffic (and the
exact greedy answers) to the previous version.
"""

from __future__ import annotations

import time

import httpx
import pytest

from core.broker import EmbeddedBroker
from core.bus import ensure_topics, make_producer, publish
from core.contracts import TOPIC_ADAPTERS
from core.settings import CommonSettings, GateSettings, GatewaySettings
from tests.gateway_server import (
    noisy_adapter,
    register_base,
    running_gate,
    running_gateway,
    running_loop,
    scoped_topic,
    silent_adapter,
    wait_policy,
)

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

TOKEN = "gate-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
GOOD, BAD = 701, 702  # names no other test of the session uses
PROBE = [{"role": "user", "content": "Describe the ocean in one sentence."}]


@pytest.fixture()
def gated(vllm_server, model_dir, vllm_store):
    register_base(vllm_server.url, model_dir, vllm_store)
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap)
        settings = GateSettings(vllm_url=vllm_server.url, admin_token=TOKEN, heldout_prompts=6,
                                heldout_prompts_max=6, eval_max_tokens=24, promotion_tolerance=0.02, load_wait_s=0)
        common = CommonSettings(bootstrap_servers=broker.bootstrap, store_dir=vllm_store)
        with running_loop(settings, GatewaySettings(vllm_url=vllm_server.url), common) as (url, gate):
            yield broker, url, gate


def _versions(url: str) -> dict:
    resp = httpx.get(f"{url}/admin/versions", headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _record(url: str, version: int) -> dict | None:
    return next((v for v in _versions(url)["versions"] if v["version"] == version), None)


def _wait_decided(url: str, version: int, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = _record(url, version)
        if rec and rec["status"] not in ("pending", "evaluating"):
            return rec
        time.sleep(0.5)
    raise AssertionError(f"the gate did not decide version {version} within {timeout_s:.0f}s: {_versions(url)}")


def _greedy(url: str, model: str) -> tuple[str, str]:
    resp = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": PROBE, "max_tokens": 16, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"], resp.headers["x-odpo-policy-version"]


def _admin(url: str, action: str, body: dict | None = None) -> dict:
    resp = httpx.post(f"{url}/admin/{action}", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _metric(url: str, series: str) -> float:
    """A sample's value from /metrics (0 when absent); counters are process-wide, so tests compare deltas."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


REFUSED = 'odpo_gate_promotion_refusals_total{reason="refused"}'
BY_GATE = 'odpo_gate_promotions_total{trigger="gate"}'
BY_ROLLBACK = 'odpo_gate_promotions_total{trigger="rollback"}'


def _listed(vllm_url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm_url}/v1/models").json()["data"]}


def test_bad_adapter_is_not_promoted_and_rollback_restores_traffic(gated, vllm_server, model_dir, vllm_store,
                                                                   announce):
    broker, url, gate = gated
    base = _wait_decided(gate, 0)
    assert base["status"] == "passed" and base["score"] is not None and base["promoted"]
    producer = make_producer(broker.bootstrap)
    before = {m: _metric(gate, m) for m in (REFUSED, BY_GATE, BY_ROLLBACK)}

    # A sound version (LoRA weights too small to change a greedy answer): scored like base, so promoted
    # (larger noise changes an answer or two, and on 6 prompts the paired interval cannot rule out a loss).
    good = noisy_adapter(vllm_store, model_dir, GOOD, scale=1e-5, seed=2, parent=0)
    announce(good)  # as the trainer does: the announcement, then the topic (the gate takes only announced ones)
    publish(producer, TOPIC_ADAPTERS, f"policy-v{GOOD}", good)
    rec = _wait_decided(gate, GOOD)
    assert rec["status"] == "passed" and rec["promoted"], rec
    assert rec["score"] >= base["score"] - 0.02
    wait_policy(url, GOOD)
    good_answer, served = _greedy(url, "policy")
    assert served == str(GOOD)

    # A wrecked version (large LoRA weights; it answers nothing): refused, `policy` stays on GOOD. It stays
    # registered in vLLM: a client may still ask for it by name, and an unload under such a request, then a
    # load again, killed vLLM (tests/test_generator_unload_race.py).
    bad = silent_adapter(vllm_store, model_dir, BAD, parent=GOOD)
    announce(bad)
    publish(producer, TOPIC_ADAPTERS, f"policy-v{BAD}", bad)
    rec = _wait_decided(gate, BAD)
    producer.close()
    print(f"held-out scores: base {base['score']:.3f}, v{GOOD} {_record(gate, GOOD)['score']:.3f}, "
          f"v{BAD} {rec['score']:.3f}")
    assert rec["status"] == "refused" and not rec["promoted"], rec
    # Empty answers: refused by the first quality signal they break (shorter than the promoted version's).
    assert rec["refused_by"] == "mean_words" and f"worse than policy-v{GOOD}'s" in rec["reason"], rec
    assert rec["score"] < base["score"] - 0.02 and rec["signals"]["empty_share"] == 1.0
    assert _versions(gate)["promoted"] == GOOD and _greedy(url, "policy") == (good_answer, str(GOOD))
    assert f"policy-v{BAD}" in _listed(vllm_server.url)
    assert _metric(gate, REFUSED) == before[REFUSED] + 1 and _metric(gate, BY_GATE) == before[BY_GATE] + 1
    assert _metric(gate, f'odpo_gate_heldout_score{{policy_version="{BAD}"}}') == pytest.approx(rec["score"])
    assert _metric(url, "odpo_gateway_policy_version") == GOOD

    # An operator forces the bad version in (the gate loads it again) ...
    assert _admin(gate, "promote", {"version": BAD})["promoted"] == BAD
    wait_policy(url, BAD)
    bad_answer, served = _greedy(url, "policy")
    assert served == str(BAD) and bad_answer == "" != good_answer
    # ... and rolls it back: traffic returns to GOOD, with exactly GOOD's answers.
    view = _admin(gate, "rollback")
    wait_policy(url, GOOD)
    assert view["promoted"] == GOOD and _greedy(url, "policy") == (good_answer, str(GOOD))
    assert _greedy(url, f"policy-v{GOOD}")[0] == good_answer
    assert _record(gate, BAD)["status"] == "rolled_back"
    assert f"policy-v{BAD}" in _listed(vllm_server.url), "never unloaded while its files are in the store"
    # Pinning holds traffic; another rollback returns to base.
    assert _admin(gate, "pin")["pinned"] is True
    assert _admin(gate, "rollback")["promoted"] == 0
    wait_policy(url, 0)
    assert _greedy(url, "policy")[1] == "0"
    assert _admin(gate, "unpin")["pinned"] is False
    assert _metric(gate, BY_ROLLBACK) == before[BY_ROLLBACK] + 2


SUPERSEDED = 'odpo_gate_promotion_refusals_total{reason="superseded"}'
NOT_SERVABLE = 'odpo_gate_promotion_refusals_total{reason="not_servable"}'
SOUND, DAMAGED = 704, 705  # names no other test of the session uses


def test_a_damaged_newest_version_does_not_void_the_sound_one_before_it(gated, vllm_server, model_dir, vllm_store,
                                                                        announce):
    """Two versions announced in the store at once (the topic brought neither), the newer one damaged (its
    files do not match its sha256): the gate takes the newest, which supersedes the older, cannot serve it,
    and then scores and promotes the older one instead of leaving `policy` where it was."""
    _, url, gate = gated
    _wait_decided(gate, 0)
    before = {m: _metric(gate, m) for m in (SUPERSEDED, NOT_SERVABLE, BY_GATE)}
    sound = noisy_adapter(vllm_store, model_dir, SOUND, scale=1e-5, seed=4, parent=0)
    damaged = noisy_adapter(vllm_store, model_dir, DAMAGED, scale=1e-5, seed=5, parent=SOUND)
    announce(sound)
    announce(damaged.model_copy(update={"sha256": "0" * 64}))
    rec = _wait_decided(gate, DAMAGED)
    assert rec["status"] == "failed" and "sha256" in rec["reason"], rec
    rec = _wait_decided(gate, SOUND)
    assert rec["status"] == "passed" and rec["promoted"], rec
    wait_policy(url, SOUND)
    assert _greedy(url, "policy")[1] == str(SOUND)
    # Both came from one look at the store: the damaged one superseded the sound one, which then came back.
    assert _metric(gate, SUPERSEDED) == before[SUPERSEDED] + 1
    assert _metric(gate, NOT_SERVABLE) == before[NOT_SERVABLE] + 1 and _metric(gate, BY_GATE) == before[BY_GATE] + 1
    assert f"policy-v{DAMAGED}" not in _listed(vllm_server.url)


RESTARTED = 703  # names no other test of the session uses


def _registry(url: str) -> dict:
    """The admin view without what vLLM has loaded right now, and without the gate's writer state (`control`)."""
    view = {k: v for k, v in _versions(url).items() if k != "control"}
    return {**view, "versions": [{k: v for k, v in r.items() if k != "loaded"} for r in view["versions"]]}


def test_a_restarted_gate_keeps_scores_promotions_and_the_pin(vllm_server, model_dir, vllm_store, tmp_path,
                                                              announce):
    """Two gate processes' lifetimes over one registry file and one broker: the second forgets nothing and
    scores nothing again, and a gateway started after it routes as it decided; a third gate with another held-out
    evaluation scores the promoted version again."""
    register_base(vllm_server.url, model_dir, vllm_store)
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap)
        settings = GateSettings(vllm_url=vllm_server.url, admin_token=TOKEN, heldout_prompts=4,
                                heldout_prompts_max=4, eval_max_tokens=16, promotion_tolerance=0.02, load_wait_s=0,
                                registry_file=tmp_path / "registry.json", control_topic=scoped_topic())
        common = CommonSettings(bootstrap_servers=broker.bootstrap, store_dir=vllm_store)
        with running_gate(settings, common) as gate:
            _wait_decided(gate, 0)
            producer = make_producer(broker.bootstrap)
            restarted = noisy_adapter(vllm_store, model_dir, RESTARTED, scale=1e-5, seed=3, parent=0)
            announce(restarted)
            publish(producer, TOPIC_ADAPTERS, f"policy-v{RESTARTED}", restarted)
            producer.close()
            assert _wait_decided(gate, RESTARTED)["promoted"]
            _admin(gate, "rollback")
            _admin(gate, "pin")
            before = _registry(gate)
        assert (before["promoted"], before["pinned"]) == (0, True)

        with running_gate(settings, common) as gate, running_gateway(
                GatewaySettings(vllm_url=vllm_server.url, control_topic=settings.control_topic), common) as url:
            time.sleep(3)  # time for the gate to act, if it (wrongly) thought anything needed scoring
            assert _registry(gate) == before, "the restarted gate has the same registry"
            wait_policy(url, 0)
            assert _greedy(url, "policy")[1] == "0"
            assert _metric(url, "odpo_gateway_policy_version") == 0
            assert _metric(gate, f'odpo_gate_heldout_score{{policy_version="{RESTARTED}"}}') == pytest.approx(
                _record(gate, RESTARTED)["score"])

        with running_gate(settings.model_copy(update={"heldout_prompts": 3, "heldout_prompts_max": 3}), common) as gate:
            deadline = time.monotonic() + 240
            while (base := _record(gate, 0))["score"] is None:
                assert time.monotonic() < deadline, "base was not scored again under the new evaluation"
                time.sleep(0.5)
            assert base["evaluated_at"] > before["versions"][-1]["evaluated_at"]
            rec = _record(gate, RESTARTED)
            assert (rec["status"], rec["score"]) == ("rolled_back", None)
            assert _versions(gate)["pinned"] is True
