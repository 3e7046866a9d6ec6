"""The serving engines the gateway routes to: one vLLM, or several replicas.

`vllm_url` names one URL or several (comma-separated). With
`vllm_resolve_dns` each host name stands for all of its addresses, re-read
every `dns_refresh_s`: point it at a Kubernetes headless Service and every
generator pod's vLLM is an endpoint, as pods come and go.

Requests go round-robin over the endpoints that are not marked down; an
endpoint that refused a connection is skipped for `engine_down_s` and then
tried again. Every replica serves every announced version (vLLM's LoRA
resolver over the adapter store, generator/lora_resolver.py), so any
endpoint can take any request.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from service.gateway.metrics import ENGINE_REQUESTS, ENGINE_UP

log = logging.getLogger(__name__)


def engine_urls(setting: str) -> list[str]:
    """The URLs named by `vllm_url` (comma-separated), without trailing slashes or repeats."""
    urls = list(dict.fromkeys(u.strip().rstrip("/") for u in setting.split(",") if u.strip()))
    if not urls:
        raise ValueError("vllm_url names no serving engine")
    return urls


def expand_dns(url: str) -> list[str]:
    """`url` once per address of its host (IPv4 first); the URL itself when the name does not resolve."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parts.port or 80, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve %s (%s); using the name as it is", host, exc)
        return [url]
    addresses = sorted({info[4][0] for info in infos}, key=lambda a: (":" in a, a))
    netloc = lambda a: (f"[{a}]" if ":" in a else a) + (f":{parts.port}" if parts.port else "")  # noqa: E731
    return [urlunsplit(parts._replace(netloc=netloc(a))) for a in addresses] or [url]


@dataclass
class EnginePool:
    """Which engine URLs exist now and which are down; thread-safe (the gate's thread and the event loop)."""

    configured: list[str]
    resolve_dns: bool = False
    dns_refresh_s: float = 10.0
    down_s: float = 5.0
    _urls: list[str] = field(default_factory=list)
    _resolved_at: float = float("-inf")
    _down_until: dict[str, float] = field(default_factory=dict)
    _turn: itertools.count = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def urls(self) -> list[str]:
        """Every endpoint, up or down (DNS re-read when due; a blocking call, cheap and rare)."""
        with self._lock:
            if self._urls and not self.dns_due():
                return list(self._urls)
        urls = [u for c in self.configured for u in (expand_dns(c) if self.resolve_dns else [c])]
        urls = list(dict.fromkeys(urls))
        with self._lock:
            gone = [u for u in self._urls if u not in urls]
            if urls != self._urls and self._urls:
                log.info("serving engines now: %s", ", ".join(urls))
            for url in gone:  # a pod that left: its state and its metric series go with it
                self._down_until.pop(url, None)
            self._urls, self._resolved_at = urls, time.monotonic()
        for url in gone:
            for metric in (ENGINE_UP, ENGINE_REQUESTS):
                try:
                    metric.remove(url)
                except KeyError:  # never had a sample
                    pass
        return list(urls)

    def dns_due(self) -> bool:
        """True when `urls()` would resolve names now (a blocking call: run it in a thread)."""
        return self.resolve_dns and time.monotonic() - self._resolved_at > self.dns_refresh_s

    def routable(self) -> list[str]:
        """Endpoints not marked down, in configured order (every endpoint when all are down: try anyway)."""
        urls = self.urls()
        now = time.monotonic()
        with self._lock:
            return [u for u in urls if self._down_until.get(u, 0.0) <= now] or urls

    def rotation(self) -> list[str]:
        """`routable()` starting from the next endpoint in round-robin order: a request tries them in turn."""
        up = self.routable()
        start = next(self._turn) % len(up)
        return up[start:] + up[:start]

    def mark_down(self, url: str, why: str) -> None:
        with self._lock:
            was_up = self._down_until.get(url, 0.0) <= time.monotonic()
            self._down_until[url] = time.monotonic() + self.down_s
        if was_up:
            log.warning("serving engine %s is down (%s); routing to the others", url, why)
        ENGINE_UP.labels(url).set(0)

    def mark_up(self, url: str) -> None:
        with self._lock:
            was_down = self._down_until.pop(url, None) is not None
        if was_down:
            log.info("serving engine %s answers again", url)
        ENGINE_UP.labels(url).set(1)

    def index(self, url: str) -> int:
        """`url`'s position among the endpoints (the `x-odpo-engine` header), -1 if gone."""
        urls = self.urls()
        return urls.index(url) if url in urls else -1
