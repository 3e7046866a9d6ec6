"""`odpo up`'s own /metrics (restarts per component) and its reading of the trainer's stale-pair counter."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, Counter, start_http_server

from service.up_metrics import TrainerDrops, UpMetrics, sample_value


def test_restarts_are_served_per_component():
    metrics = UpMetrics(["trainer", "generator", "broker"])
    try:
        port = metrics.serve(0)
        metrics.restarted("trainer")
        metrics.restarted("broker")
        metrics.restarted("trainer")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        got = {c: sample_value(text, "odpo_up_component_restarts_total", {"component": c})
               for c in ("trainer", "generator", "broker")}
        assert got == {"trainer": 2.0, "generator": 0.0, "broker": 1.0}
        assert "odpo_trainer" not in text, "its own registry: nothing else leaks in"
    finally:
        metrics.close()


def _fake_trainer(dropped: float):
    registry = CollectorRegistry()
    c = Counter("odpo_trainer_pairs_dropped_total", "drops", ["reason"], registry=registry)
    c.labels("stale").inc(dropped)
    c.labels("duplicate").inc(100)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    return server, c


def test_stale_drops_add_up_over_trainer_restarts():
    server, counter = _fake_trainer(3)
    port = server.server_port
    drops = TrainerDrops(f"http://127.0.0.1:{port}/metrics", every_s=60)
    try:
        assert drops.update() == 3
        counter.labels("stale").inc(2)
        assert drops.update() == 3, "read at most every every_s"
        assert drops.update(force=True) == 5
    finally:
        server.shutdown()
        server.server_close()
    assert drops.update(force=True) == 5, "a trainer that is away keeps the count"
    server, counter = _fake_trainer(2)  # the restarted trainer counts from 0 again
    drops.url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        assert drops.update(force=True) == 7
    finally:
        server.shutdown()
        server.server_close()
