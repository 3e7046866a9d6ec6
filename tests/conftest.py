"""Shared fixtures: a real Tansu broker and the real packaged base model (converted once)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from service.assets import base_model_dir
from service.broker import EmbeddedBroker
from service.bus import ensure_topics, make_producer

CACHE_DIR = Path(os.environ.get("ODPO_CACHE_DIR", "~/.cache/odpo")).expanduser()


@pytest.fixture(scope="session")
def broker():
    """One real memory-only Tansu broker for the session, all topics created."""
    with EmbeddedBroker() as b:
        ensure_topics(b.bootstrap)
        yield b


@pytest.fixture()
def producer(broker):
    p = make_producer(broker.bootstrap)
    yield p
    p.close()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct as an HF folder (converted on first use, then cached)."""
    return base_model_dir(CACHE_DIR)


@pytest.fixture()
def group_id() -> str:
    """A fresh consumer group, so tests sharing the session broker never see each other's offsets."""
    return f"test-{uuid.uuid4().hex[:8]}"
