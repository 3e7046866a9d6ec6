"""Everything a request handler of the gateway needs, built once per app in its lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
from fastapi import Request

from core.settings import CommonSettings, GatewaySettings
from service.gateway.engine import EngineAdapters, EngineClients, ModelRouter
from service.gateway.keys import FeedbackCaps, KeyRing
from service.gateway.outbox import Outbox
from service.gateway.served import ServedStore
from service.gateway.served_log import ServedLog
from service.registry.book import VersionBook
from service.registry.follower import RegistryFollower


@dataclass
class BrokerCheck:
    """Whether the broker answers, remembered for `ttl_s` so /readyz stays cheap."""

    bootstrap: str
    ttl_s: float
    _ok: bool = False
    _at: float = float("-inf")
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def ok(self) -> bool:
        from core.broker import kafka_ready
        from service.gateway.metrics import BROKER_UP

        async with self._lock:
            if time.monotonic() - self._at > self.ttl_s:
                self._ok = await anyio.to_thread.run_sync(kafka_ready, self.bootstrap, 2.0)
                self._at = time.monotonic()
                BROKER_UP.set(1 if self._ok else 0)
            return self._ok


@dataclass
class GatewayState:
    settings: GatewaySettings
    common: CommonSettings
    clients: EngineClients  # one pooled client per serving engine (router.pool says which exist)
    book: VersionBook  # a copy of the gate's registry, kept by `registry`
    adapters: EngineAdapters
    router: ModelRouter
    served: ServedStore
    outbox: Outbox
    broker: BrokerCheck
    registry: RegistryFollower
    served_log: ServedLog | None = None  # odpo.served, shared with the other replicas (None: `served` is this one's)
    keys: KeyRing | None = None  # client API keys (None: off)
    feedback_caps: FeedbackCaps = field(default_factory=FeedbackCaps)  # per key: feedback per response, per hour


def state_of(request: Request) -> GatewayState:
    return request.app.state.gateway
