"""What `odpo up` itself serves on /metrics, and what it reads from the trainer's.

Served (its own registry, so nothing else leaks in):
- `odpo_up_component_restarts_total{component}`: restarts of each supervised
  process (the components and `broker`);
- `odpo_up_recent_pairs_stale_ratio`: share of the recent sampled pairs that
  are too old to be trained (see `service.loop_watch.StalePairs`);
- `odpo_up_trainer_lag_pairs`: pairs the trainer has not committed yet (the
  feed holds at `--pair-backlog`; service/up_pace.py);
- `odpo_up_engine_crashes_total{cause}`: vLLM deaths, by the exception its log
  names (the generator exits when its vLLM dies under `odpo up`, so its own
  `odpo_generator_engine_crashes_total` is rarely scraped in time).
Read: the trainer's `odpo_trainer_pairs_dropped_total{reason="stale"}`,
added up over trainer restarts (a restarted trainer counts from zero again).
"""

from __future__ import annotations

import re
import time

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.parser import text_string_to_metric_families

ENGINE_DIED = re.compile(r"vLLM died \((\w{1,40})\)")  # what the generator logs as its exit cause


class UpMetrics:
    def __init__(self, components: list[str]):
        self.registry = CollectorRegistry()
        self.restarts = Counter("odpo_up_component_restarts_total", "Restarts of each process `odpo up` supervises.",
                                ["component"], registry=self.registry)
        self.stale_ratio = Gauge("odpo_up_recent_pairs_stale_ratio", "Share of the recent sampled pairs older "
                                 "than the newest version minus max_staleness (dropped by the trainer).",
                                 registry=self.registry)
        self.trainer_lag = Gauge("odpo_up_trainer_lag_pairs", "Pairs on odpo.preferences the trainer has not "
                                 "committed (odpo up holds new prompts at --pair-backlog).", registry=self.registry)
        self.engine_crashes = Counter("odpo_up_engine_crashes_total", "vLLM servers that died, by the exception "
                                      "vLLM's log names (`killed`: none).", ["cause"], registry=self.registry)
        for name in components:
            self.restarts.labels(name)  # present (at 0) from the start
        self._server = None

    def serve(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0 = a free port); returns the port."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def restarted(self, component: str) -> None:
        self.restarts.labels(component).inc()

    def exit_cause(self, component: str, cause: str) -> None:
        """A component's logged reason for exiting; `vLLM died (<cause>): ...` counts an engine crash."""
        crash = ENGINE_DIED.match(cause)
        if crash:
            self.engine_crashes.labels(crash.group(1)).inc()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def sample_value(text: str, sample: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample (full sample name, e.g. `..._total`) in a Prometheus text exposition, or None."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    return None


def sample_sum(text: str, sample: str) -> float:
    """The sum of every sample of that name (all label values) in a Prometheus text exposition (0 if none)."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == sample)


class TrainerDrops:
    """Pairs the trainer dropped as stale, over its restarts, read from its /metrics every `every_s`."""

    def __init__(self, url: str, every_s: float = 10.0):
        self.url, self.every_s = url, every_s
        self.total = 0  # over every trainer process of this run
        self._last, self._process = 0.0, None  # the current process's counter and start time
        self._read_at = 0.0

    def update(self, force: bool = False) -> int:
        if not force and time.monotonic() - self._read_at < self.every_s:
            return self.total
        self._read_at = time.monotonic()
        try:
            text = httpx.get(self.url, timeout=3).text
            value = sample_value(text, "odpo_trainer_pairs_dropped_total", {"reason": "stale"})
            process = sample_value(text, "process_start_time_seconds")
        except (httpx.HTTPError, ValueError):
            return self.total  # the trainer is starting, restarting or busy: read it next time
        if value is not None:
            if process != self._process or value < self._last:  # a new trainer process counts from 0
                self._last, self._process = 0.0, process
            self.total += int(value - self._last)
            self._last = value
        return self.total
