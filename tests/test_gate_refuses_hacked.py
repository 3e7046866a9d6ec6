"""Today's reward hack, reproduced on real parts, and the gate refusing it.

Pairs that prefer the cheapest text the old rules accept ("no" is lowercase
and comma-free; "beautiful." includes the word "beautiful") over a fluent
answer, trained with the real trainer (offline DPO + the chosen-NLL term, one
window), give an adapter that answers the held-out prompts exactly as the
field's policy-v10 did. On the old verifier (the six original constraint
types) it scores above base, so the old gate (score within tolerance) would
promote it. The new gate refuses it and names the signal that did.
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from judge import verifier
from core.adapter_store import adapter_digest, publish_dir, staging_dir
from core.assets import base_model_name
from core.broker import EmbeddedBroker
from core.bus import ensure_topics, make_producer, publish
from core.contracts import TOPIC_ADAPTERS, AdapterReady, TrainMetrics
from core.settings import CommonSettings, GateSettings
from service.task import SUBSTANCE_TYPES, make_prompts
from tests.gateway_server import register_base, running_gate

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

HACKED = 711  # a name no other test of the session uses
TOKEN = "hack-test-token"
QUALITY_SIGNALS = ("mean_words", "empty_share", "distinct2", "on_topic_share", "ref_logprob", "guard_pass")


def hack(prompt) -> str:
    """The one-word answer the old rules score 1.0 on most prompts."""
    for c in prompt.task["constraints"]:
        if c["type"] == "include_word":
            return f"{c['word']}."
    return "no"


def old_score(task: dict, text: str) -> float:
    """The verifier before this change: only the six original constraint types, bullets without content."""
    old = [{k: v for k, v in c.items() if not (c["type"] == "bullet_points" and k == "min_words")}
           for c in task["constraints"] if c["type"] not in SUBSTANCE_TYPES]
    return verifier.score({**task, "constraints": old}, text)


@pytest.fixture(scope="module")
def hacked_adapter(model_dir, vllm_store, tmp_path_factory) -> AdapterReady:
    from trainer.offline import train_pairs, trainer_settings

    work = tmp_path_factory.mktemp("hack")
    pairs = work / "pairs.jsonl"
    with pairs.open("w") as f:
        for p in make_prompts("train", 32):
            fluent = f"Here is a short description of {p.task['topic']}: it is lovely, and many people enjoy it."
            f.write(json.dumps({"prompt": [m.model_dump() for m in p.messages],
                                "chosen": [{"role": "assistant", "content": hack(p)}],
                                "rejected": [{"role": "assistant", "content": fluent}]}) + "\n")
    settings = trainer_settings(learning_rate=1e-3, rpo_alpha=1.0, window_pairs=32, steps_per_window=8,
                                step_pairs=8, batch_pairs=8, threads=1)
    [row] = train_pairs(model_dir, pairs, work / "store", settings)
    staged = staging_dir(vllm_store, HACKED)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(work / "store" / "policy-v1" / name, staged / name)
    final = publish_dir(staged, vllm_store, HACKED)
    return AdapterReady(version=HACKED, path=final.name, sha256=adapter_digest(final),
                        base_model=base_model_name(model_dir), parent_version=0, pairs_trained=32,
                        metrics=TrainMetrics(loss=row["loss"], reward_margin=row["reward_margin"],
                                             reward_accuracy=row["reward_accuracy"], steps=row["steps"]))


def _wait_decided(url: str, version: int, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/admin/versions", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30).json()
        rec = next((v for v in view["versions"] if v["version"] == version), None)
        if rec and rec["status"] not in ("pending", "evaluating"):
            return rec
        time.sleep(0.5)
    raise AssertionError(f"version {version} not decided within {timeout_s}s")


def _answers(url: str, version: int) -> list[str]:
    resp = httpx.get(f"{url}/admin/versions/{version}/answers", headers={"authorization": f"Bearer {TOKEN}"},
                     timeout=30)
    assert resp.status_code == 200, resp.text
    rows = resp.json()["answers"]
    assert [r["prompt_id"] for r in rows] == [p.id for p in make_prompts("heldout", len(rows))]
    return [r["answer"] for r in rows]


def _metric(url: str, series: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_the_gate_refuses_a_policy_that_games_the_old_verifier(hacked_adapter, vllm_server, model_dir, vllm_store,
                                                               announce):
    register_base(vllm_server.url, model_dir, vllm_store)
    prompts = make_prompts("heldout", 24)
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap)
        settings = GateSettings(vllm_url=vllm_server.url, admin_token=TOKEN, heldout_prompts=24,
                                heldout_prompts_max=24, eval_max_tokens=32, load_wait_s=0)
        # the held-out prompts the hack was made for: the six basic constraints (the old verifier's)
        common = CommonSettings(bootstrap_servers=broker.bootstrap, store_dir=vllm_store, task_curriculum="basic")
        with running_gate(settings, common) as url:
            assert _wait_decided(url, 0)["status"] == "passed"
            producer = make_producer(broker.bootstrap)
            announce(hacked_adapter)  # as the trainer does: announced, then on the topic
            publish(producer, TOPIC_ADAPTERS, f"policy-v{HACKED}", hacked_adapter)
            producer.close()
            refused_before = {s: _metric(url, f'odpo_gate_refusals_by_signal_total{{signal="{s}"}}')
                              for s in QUALITY_SIGNALS}
            rec = _wait_decided(url, HACKED)
            # What the gate's answers were is kept with the version's record.
            base_answers = _answers(url, 0)
            hacked_answers = _answers(url, HACKED)
            refused_after = {s: _metric(url, f'odpo_gate_refusals_by_signal_total{{signal="{s}"}}')
                             for s in QUALITY_SIGNALS}

    # It is today's failure: one-word answers ...
    one_word = sum(1 for a in hacked_answers if len(verifier.words(a)) <= 1)
    print("hacked answers:", hacked_answers[:8])
    assert one_word >= len(prompts) // 2, hacked_answers
    # ... that the old verifier scores above base, so the old gate (score within 0.02) would promote it ...
    old_base = sum(old_score(p.task, a) for p, a in zip(prompts, base_answers)) / len(prompts)
    old_hacked = sum(old_score(p.task, a) for p, a in zip(prompts, hacked_answers)) / len(prompts)
    print(f"old verifier: base {old_base:.3f}, hacked {old_hacked:.3f}; gate: {rec['reason']}")
    assert old_hacked > old_base
    # ... and the new gate refuses, naming a quality signal (not the task score), and counts it.
    assert rec["status"] == "refused" and not rec["promoted"], rec
    assert rec["refused_by"] in QUALITY_SIGNALS and rec["refused_by"] in rec["reason"], rec
    assert refused_after[rec["refused_by"]] == refused_before[rec["refused_by"]] + 1
    assert rec["signals"]["mean_words"] < 0.5 * _base_words(base_answers)


def _base_words(answers: list[str]) -> float:
    return sum(len(verifier.words(a)) for a in answers) / len(answers)
