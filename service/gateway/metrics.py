"""The gateway's Prometheus metrics (`odpo_gateway_*`) and the middleware that counts every request.

Label values stay bounded: `route` is a route template (or `other`), `alias`
one of policy/base/version/other/-, `status` an HTTP status. The gate's
scores and decisions are the gate's own metrics (service/gate/metrics.py).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from core.contracts import BASE_MODEL_NAME, POLICY_ALIAS, parse_version_name

REQUESTS = Counter("odpo_gateway_requests_total", "Requests by route, model alias and status.",
                   ["route", "alias", "status"])
LATENCY = Histogram("odpo_gateway_request_seconds",
                    "Request latency by route, model alias and status (to the last byte for streams).",
                    ["route", "alias", "status"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
POLICY_VERSION = Gauge("odpo_gateway_policy_version", "Version the alias `policy` resolves to on this replica "
                       "(the one the gate promoted, as read from the control topic).")
PINNED = Gauge("odpo_gateway_policy_pinned", "1 while an operator has pinned the promoted version.")
MIRRORED = Counter("odpo_gateway_mirrored_prompts_total", "Client prompts published to odpo.prompts.")
MIRROR_DROPPED = Counter("odpo_gateway_mirror_dropped_total", "Client prompts not mirrored, by reason.", ["reason"])
FEEDBACK = Counter("odpo_gateway_feedback_total", "Feedback published to odpo.feedback, by kind.", ["kind"])
ENQUEUED = Counter("odpo_gateway_enqueued_prompts_total", "Prompts published through /v1/prompts.")
ENGINE_UP = Gauge("odpo_gateway_engine_up", "1 while a serving engine (vLLM replica) answers, 0 while it is "
                  "skipped as down.", ["engine"])
BROKER_UP = Gauge("odpo_gateway_broker_up", "1 while the Kafka broker answers the gateway's checks, 0 while it does "
                  "not: completions are still served; mirrored prompts are dropped (odpo_gateway_mirror_dropped_total) "
                  "and feedback answers 503 meanwhile.")
ENGINE_REQUESTS = Counter("odpo_gateway_engine_requests_total", "Requests forwarded to each serving engine.",
                          ["engine"])
SERVED_KEPT = Gauge("odpo_gateway_served_responses", "Served responses kept for feedback.")

KNOWN_ALIASES = (POLICY_ALIAS, BASE_MODEL_NAME)


def alias_label(model: object) -> str:
    """A bounded label value for a requested model name."""
    if model in KNOWN_ALIASES:
        return str(model)
    return "version" if isinstance(model, str) and parse_version_name(model) is not None else "other"


class RequestMetrics:
    """Pure ASGI middleware: counts and times every HTTP request by route template, alias and status.

    A handler sets `request.state.odpo_alias`; streams are timed to their last byte.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500, False]  # status code, observed yet
        state = scope.setdefault("state", {})

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not status[1]:
                status[1] = True
                _observe(scope, state, status[0], started)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not status[1]:  # a crash, or a client that went away mid-stream
                _observe(scope, state, status[0], started)


def _observe(scope, state, status: int, started: float) -> None:
    route = scope.get("route")
    path = getattr(route, "path", None) or "other"
    alias = state.get("odpo_alias", "-")
    code = str(status)
    REQUESTS.labels(path, alias, code).inc()
    LATENCY.labels(path, alias, code).observe(time.perf_counter() - started)


def sync_promoted(book) -> None:
    """Set the gauges of what this replica serves as `policy` from its copy of the gate's registry."""
    POLICY_VERSION.set(book.promoted)
    PINNED.set(1 if book.pinned else 0)
