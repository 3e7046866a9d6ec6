"""The adapter store, not odpo.adapters, is the record of versions: a generator whose topic lost its messages
(a new broker, retention) still serves the newest version, from the store, on the real vLLM server.

Versions used here (names on the shared server must not collide): 111-115. They live in a store of this
module's own: other modules run generators on the shared store and must not find these manifests there.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import httpx
import pytest
from prometheus_client import REGISTRY

from generator.adapters import AdapterManager
from generator.watcher import AdapterWatcher
from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter
from core.adapter_store import write_manifest
from core.bus import Inbox, ensure_topics, make_producer
from core.contracts import AdapterReady
from tests.test_generator_swap import make_peft_model, publish_adapter, randomize_lora_b

pytestmark = [pytest.mark.vllm, pytest.mark.integration]


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def checksum_failures() -> float:
    return REGISTRY.get_sample_value("odpo_generator_swap_failures_total", {"reason": "checksum"}) or 0.0


@contextlib.contextmanager
def store_watcher(broker, vllm_server, vllm_store, model_dir, store):
    """A generator's watcher over `store` whose topic holds nothing (what a fresh broker holds):
    (watcher, adapter manager, vLLM client)."""
    topic = f"odpo.adapters.empty-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, [topic])
    producer = make_producer(broker.bootstrap)
    inbox = Inbox(broker.bootstrap, topic, AdapterReady, "generator", producer, group_id=None)
    client = httpx.Client(base_url=vllm_server.url, timeout=120)
    adapters = AdapterManager(client, store, model_dir)
    adapters.register_base(write_zero_adapter(model_dir, vllm_store / ZERO_ADAPTER_DIR))
    try:
        yield AdapterWatcher(inbox, adapters, store, store_check_s=0.5), adapters, client
    finally:
        inbox.close()
        producer.close()
        client.close()


def test_a_generator_with_an_empty_topic_serves_the_store_s_newest_version(broker, vllm_server, vllm_store,
                                                                            model_dir, tmp_path):
    store = tmp_path / "store"
    peft = make_peft_model(model_dir)
    randomize_lora_b(peft, seed=111)
    write_manifest(store, publish_adapter(peft, store, 111, model_dir))

    halt = threading.Event()
    catch_ups = metric("odpo_generator_store_catch_ups_total")
    with store_watcher(broker, vllm_server, vllm_store, model_dir, store) as (watcher, adapters, client):
        try:
            assert watcher.catch_up(halt) == 111 and adapters.current_version == 111
            assert metric("odpo_generator_store_catch_ups_total") - catch_ups == 1
            assert metric("odpo_generator_versions_behind") == 0

            follower = threading.Thread(target=watcher.run, args=(halt,), daemon=True)
            follower.start()
            randomize_lora_b(peft, seed=112)
            write_manifest(store, publish_adapter(peft, store, 112, model_dir))  # in the store only, never on Kafka
            deadline = time.monotonic() + 60
            while adapters.current_version != 112 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert adapters.current_version == 112, "a version only in the store was not picked up by the timer"
            assert "policy-v112" in {m["id"] for m in client.get("/v1/models").json()["data"]}

            # A damaged version in the store is refused (its files do not match its digest); v112 keeps serving.
            randomize_lora_b(peft, seed=113)
            bad = publish_adapter(peft, store, 113, model_dir).model_copy(update={"sha256": "0" * 64})
            write_manifest(store, bad)
            refused = checksum_failures()
            deadline = time.monotonic() + 30
            while checksum_failures() == refused and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)  # several more store checks: the refused version is not tried again and again
            assert checksum_failures() == refused + 1
            assert adapters.current_version == 112 and metric("odpo_generator_versions_behind") == 1
        finally:
            halt.set()


def test_a_restarted_generator_serves_the_newest_sound_version_when_the_newest_is_damaged(
        broker, vllm_server, vllm_store, model_dir, tmp_path):
    """The topic lost its messages and the store's newest version is damaged: the generator serves the one
    before it, not `base` (every pair sampled with base would be stale to a trainer at that version)."""
    store = tmp_path / "store"
    peft = make_peft_model(model_dir)
    randomize_lora_b(peft, seed=114)
    write_manifest(store, publish_adapter(peft, store, 114, model_dir))
    randomize_lora_b(peft, seed=115)
    write_manifest(store, publish_adapter(peft, store, 115, model_dir).model_copy(update={"sha256": "0" * 64}))
    refused = checksum_failures()
    with store_watcher(broker, vllm_server, vllm_store, model_dir, store) as (watcher, adapters, client):
        assert watcher.catch_up(threading.Event()) == 114 and adapters.current_version == 114
        assert checksum_failures() == refused + 1
        assert metric("odpo_generator_versions_behind") == 1
        assert watcher.check_store(threading.Event()) is None, "the damaged version is not tried again"
        assert checksum_failures() == refused + 1
        assert "policy-v114" in {m["id"] for m in client.get("/v1/models").json()["data"]}
