"""Shared fixtures: a real Tansu broker and the real packaged base model (converted once)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from core.assets import base_model_dir
from core.broker import EmbeddedBroker
from core.bus import ensure_topics, make_producer

CACHE_DIR = Path(os.environ.get("ODPO_CACHE_DIR", "~/.cache/odpo")).expanduser()


def _broker_with_topics():
    with EmbeddedBroker() as b:
        ensure_topics(b.bootstrap)
        yield b


@pytest.fixture(scope="session")
def broker():
    """One real memory-only Tansu broker for the session, all topics created."""
    yield from _broker_with_topics()


@pytest.fixture(scope="module")
def own_broker():
    """A broker of the test module's own, all topics created: what the module publishes (prompts, feedback)
    is not consumed by other modules' components, and it reads back only its own messages."""
    yield from _broker_with_topics()


@pytest.fixture()
def producer(broker):
    p = make_producer(broker.bootstrap)
    yield p
    p.close()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct as an HF folder (converted on first use, then cached)."""
    return base_model_dir(CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(model_dir, tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, width 64) with the packaged model's tokenizer, built once per session."""
    from tests.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", model_dir)


@pytest.fixture()
def group_id() -> str:
    """A fresh consumer group, so tests sharing the session broker never see each other's offsets."""
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def vllm_store(tmp_path_factory) -> Path:
    """The adapter store of the shared vLLM server (adapters it loads must live here)."""
    return tmp_path_factory.mktemp("vllm-store")


@pytest.fixture(scope="session")
def vllm_server(model_dir, vllm_store, tmp_path_factory):
    """One real vLLM server (the CPU build here) on a free port for the whole session.

    Starting one costs about a minute, so tests share it: each test loads its
    adapters under names no other test uses. Its log is `server.log_file`.
    """
    from generator.server import VllmServer
    from core.settings import GeneratorSettings

    log_file = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    server = VllmServer(model_dir, GeneratorSettings(vllm_port=0, startup_timeout_s=400), log_file=log_file,
                        lora_store=vllm_store)
    server.start()
    pgid = server.pid
    yield server
    server.stop()
    deadline = time.monotonic() + 10  # nothing of vLLM (API server, engine core, workers) may outlive it
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"vLLM process group {pgid} outlived server.stop()"
        time.sleep(0.2)


@pytest.fixture()
def announce(vllm_store):
    """Announce versions in the shared vLLM store for one test (`announce(ready)`); the announcements are
    removed at its end, so the gates of later tests, which take the store's newest announced version, never
    see them."""
    from core.adapter_store import write_manifest

    written = []
    yield lambda ready: written.append(write_manifest(vllm_store, ready))
    for path in written:
        path.unlink(missing_ok=True)


@pytest.fixture()
def manager(vllm_server, vllm_store, model_dir):
    """A fresh AdapterManager (its own view) on the shared vLLM server; `base` is adopted if already loaded."""
    import httpx

    from generator.adapters import AdapterManager
    from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter

    client = httpx.Client(base_url=vllm_server.url, timeout=120)
    adapters = AdapterManager(client, vllm_store, model_dir)
    adapters.register_base(write_zero_adapter(model_dir, vllm_store / ZERO_ADAPTER_DIR))
    yield adapters
    client.close()
