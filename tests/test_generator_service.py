"""The generator on the real broker and the shared vLLM server: sampling loop, hot swap, DLQ, commits.

Versions used here (names on the shared server must not collide): 101-103.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import httpx
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from generator.adapters import AdapterManager
from generator.loop import SamplerLoop
from generator.sampler import Sampler
from generator.service import run
from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter
from core.broker import EmbeddedBroker
from core.bus import Inbox, ensure_topics, make_producer, publish
from core.contracts import (TOPIC_ADAPTERS, TOPIC_CANDIDATES, TOPIC_DLQ, TOPIC_PROMPTS, CandidateSet,
                               DeadLetter, PromptEvent)
from core.settings import CommonSettings, GeneratorSettings
from tests.test_generator_swap import make_peft_model, publish_adapter, randomize_lora_b
from tests.topics import MessageTail

pytestmark = [pytest.mark.vllm, pytest.mark.integration]


def prompt(tag: str, text: str) -> PromptEvent:
    return PromptEvent(id=f"{tag}-{uuid.uuid4().hex[:8]}", messages=[{"role": "user", "content": text}],
                       source="test")


def send(producer, topic: str, key: str, payload: bytes) -> int:
    """Publish and return the record's offset. (Tansu's ListOffsets answers the last batch's base
    offset + 1, not the end, after a multi-record batch, so tests do not ask it for the end.)"""
    return producer.send(topic, key=key.encode(), value=payload).get(timeout=30).offset


def committed(bootstrap: str, group: str, topic: str) -> int | None:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(topic, 0))
    finally:
        c.close()


def test_service_samples_hot_swaps_and_dead_letters(broker, producer, vllm_server, vllm_store, model_dir,
                                                    tmp_path, group_id, announce):
    peft = make_peft_model(model_dir)
    randomize_lora_b(peft, seed=101)
    ready101 = publish_adapter(peft, vllm_store, 101, model_dir)
    announce(ready101)  # as the trainer does: announced in the store, then on the topic
    publish(producer, TOPIC_ADAPTERS, "policy-v101", ready101)
    common = CommonSettings(bootstrap_servers=broker.bootstrap, store_dir=vllm_store, cache_dir=tmp_path,
                            base_model=model_dir)
    settings = GeneratorSettings(vllm_url=vllm_server.url, n=2, max_tokens=8, max_in_flight=2, group_id=group_id)
    stop = threading.Event()
    service = threading.Thread(target=run, args=(common, settings, stop), name="generator-under-test")
    candidates = MessageTail(broker.bootstrap, TOPIC_CANDIDATES, CandidateSet)
    dlq = MessageTail(broker.bootstrap, TOPIC_DLQ, DeadLetter)
    try:
        first = [prompt("svc", "Say hello."), prompt("svc", "Count to three.")]
        bad_key = f"bad-{uuid.uuid4().hex[:8]}"
        send(producer, TOPIC_PROMPTS, first[0].id, first[0].to_bytes())
        send(producer, TOPIC_PROMPTS, bad_key, b'{"schema_version": 1, "id": "x"}')
        send(producer, TOPIC_PROMPTS, first[1].id, first[1].to_bytes())
        service.start()

        ids = {p.id for p in first}
        got = candidates.wait_for(lambda c: c.prompt.id in ids, 240, "candidates of the first prompts", count=2)
        assert {c.policy_version for c in got} == {101}, "catch-up serves the newest version before sampling"
        assert all(len(c.completions) == 2 and c.sampling.max_tokens == 8 for c in got)
        letter = dlq.wait_for(lambda d: d.key == bad_key, 30, "the malformed prompt on the DLQ")[0]
        assert (letter.source_topic, letter.component) == (TOPIC_PROMPTS, "generator")
        assert "invalid PromptEvent" in letter.error

        # A live swap, then a corrupted version that must be refused while 102 keeps serving.
        randomize_lora_b(peft, seed=102)
        ready102 = publish_adapter(peft, vllm_store, 102, model_dir)
        announce(ready102)
        publish(producer, TOPIC_ADAPTERS, "policy-v102", ready102)
        randomize_lora_b(peft, seed=103)
        ready103 = publish_adapter(peft, vllm_store, 103, model_dir)
        announce(ready103)
        weights = vllm_store / ready103.path / "adapter_model.safetensors"  # its files damaged after the announcement
        weights.write_bytes(weights.read_bytes()[:-16] + bytes(16))
        publish(producer, TOPIC_ADAPTERS, "policy-v103", ready103)
        refused = dlq.wait_for(lambda d: d.key == "policy-v103", 60, "the corrupted adapter on the DLQ")[0]
        assert refused.source_topic == TOPIC_ADAPTERS and "sha256 mismatch" in refused.error
        assert REGISTRY.get_sample_value("odpo_generator_policy_version") == 102

        later = prompt("svc", "Name a fruit.")
        last_offset = send(producer, TOPIC_PROMPTS, later.id, later.to_bytes())
        got = candidates.wait_for(lambda c: c.prompt.id == later.id, 120, "candidates after the swap")
        assert got[0].policy_version == 102
        assert service.is_alive()
    finally:
        stop.set()
        service.join(timeout=90)
        candidates.close()
        dlq.close()
    assert not service.is_alive(), "the service stops when `stop` is set"
    assert committed(broker.bootstrap, group_id, TOPIC_PROMPTS) == last_offset + 1, "every prompt is committed"
    assert vllm_server.healthy(), "an external server is left running"


def test_loop_pauses_at_the_in_flight_bound_and_commits_in_order(broker, producer, vllm_server, vllm_store,
                                                                model_dir, group_id):
    client = httpx.Client(base_url=vllm_server.url, timeout=120)
    adapters = AdapterManager(client, vllm_store, model_dir)
    adapters.register_base(write_zero_adapter(model_dir, vllm_store / ZERO_ADAPTER_DIR))
    sampler = Sampler(client, AutoTokenizer.from_pretrained(model_dir), adapters,
                      GeneratorSettings(n=2, max_tokens=12))
    mine = [prompt("bp", f"Tell me fact number {i} about cats.") for i in range(5)]
    end = 1 + max(send(producer, TOPIC_PROMPTS, p.id, p.to_bytes()) for p in mine)
    inbox = Inbox(broker.bootstrap, TOPIC_PROMPTS, PromptEvent, "generator", producer, group_id=group_id)
    loop = SamplerLoop(inbox, sampler, producer, max_in_flight=2, max_attempts=3, stop=threading.Event())
    tp = TopicPartition(TOPIC_PROMPTS, 0)
    paused_when_full = 0
    try:
        deadline = time.monotonic() + 240
        while loop.committed.get(tp) != end:
            assert time.monotonic() < deadline, "the loop did not commit every prompt"
            was_full = loop.in_flight >= 2
            loop.step()
            assert loop.in_flight <= 2
            if was_full and inbox.consumer.paused():
                paused_when_full += 1
    finally:
        loop.close(30)
        inbox.close()
        client.close()
    assert paused_when_full > 0, "partitions are paused while the in-flight budget is full"
    assert committed(broker.bootstrap, group_id, TOPIC_PROMPTS) == end
    reader = MessageTail(broker.bootstrap, TOPIC_CANDIDATES, CandidateSet)
    try:
        ids = {p.id for p in mine}
        got = reader.wait_for(lambda c: c.prompt.id in ids, 30, "candidates of every prompt", count=5)
    finally:
        reader.close()
    assert {c.prompt.id for c in got} == ids


def test_loop_reads_a_recreated_prompt_topic_from_its_start(vllm_server, vllm_store, model_dir, tmp_path):
    """A private broker killed and started again empty: the loop samples the new topic's prompts from its
    start and commits them there, though its old commits named higher offsets."""
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start()
    ensure_topics(broker.bootstrap, [TOPIC_PROMPTS, TOPIC_CANDIDATES, TOPIC_DLQ])
    producer = make_producer(broker.bootstrap)
    client = httpx.Client(base_url=vllm_server.url, timeout=120)
    adapters = AdapterManager(client, vllm_store, model_dir)
    adapters.register_base(write_zero_adapter(model_dir, vllm_store / ZERO_ADAPTER_DIR))
    sampler = Sampler(client, AutoTokenizer.from_pretrained(model_dir), adapters,
                      GeneratorSettings(n=2, max_tokens=8))
    inbox = Inbox(broker.bootstrap, TOPIC_PROMPTS, PromptEvent, "generator", producer, group_id="gen-recreated")
    loop = SamplerLoop(inbox, sampler, producer, max_in_flight=2, max_attempts=3, stop=threading.Event())
    tp = TopicPartition(TOPIC_PROMPTS, 0)

    def run_until(cond, what: str) -> None:
        deadline = time.monotonic() + 180
        while not cond():
            assert time.monotonic() < deadline, f"{what}: committed {loop.committed}, rewinds {inbox.rewinds}"
            try:
                loop.step()
            except KafkaError:  # the broker is coming back: kafka-python reconnects
                time.sleep(0.5)

    try:
        for i in range(4):
            p = prompt("old", f"Name animal number {i}.")
            send(producer, TOPIC_PROMPTS, p.id, p.to_bytes())
        run_until(lambda: loop.committed.get(tp) == 4, "the old topic's 4 prompts committed")
        # A restarted Tansu may create the topic on a client's first request, with several partitions.

        os.kill(broker.pid, signal.SIGKILL)
        broker.start()  # the same address, empty
        ensure_topics(broker.bootstrap, [TOPIC_PROMPTS, TOPIC_CANDIDATES, TOPIC_DLQ])
        fresh = make_producer(broker.bootstrap)
        new = [prompt("new", f"Name colour number {i}.") for i in range(2)]
        for p in new:
            send(fresh, TOPIC_PROMPTS, p.id, p.to_bytes())
        fresh.close()
        run_until(lambda: sum(loop.committed.values()) == 2, "the new topic's 2 prompts committed (below the old 4)")
        assert inbox.rewinds == 1
        reader = MessageTail(broker.bootstrap, TOPIC_CANDIDATES, CandidateSet)
        try:
            got = reader.wait_for(lambda c: c.prompt.id in {p.id for p in new}, 30, "candidates of both", count=2)
        finally:
            reader.close()
        assert {c.prompt.id for c in got} == {p.id for p in new}
    finally:
        loop.close(30)
        inbox.close()
        producer.close()
        client.close()
        broker.stop()
