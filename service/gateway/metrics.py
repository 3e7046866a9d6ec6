"""The gateway's Prometheus metrics (`odpo_gateway_*`) and the middleware that counts every request.

Label values stay bounded: `route` is a route template (or `other`), `alias`
one of policy/base/version/other/-, `status` an HTTP status, `key` a key id
from the keys file (service/gateway/keys.py) or `-`. The gate's
scores and decisions are the gate's own metrics (service/gate/metrics.py).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

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
SERVED_UNPUBLISHED = Counter("odpo_gateway_served_unpublished_total", "Served responses not published to odpo.served "
                             "(the other replicas, and this one after a restart, cannot take feedback on them), by "
                             "reason.", ["reason"])

KEY_REQUESTS = Counter("odpo_gateway_key_requests_total", "Requests by client API key id (`-`: keys off, no key or "
                       "a wrong one) and status.", ["key", "status"])
KEY_REFUSALS = Counter("odpo_gateway_key_refusals_total", "Requests refused for their API key, by key id (`-`: no "
                       "valid key) and reason (unauthenticated, forbidden, rate, daily_quota, feedback_per_hour, "
                       "feedback_per_response).", ["key", "reason"])
TOO_LARGE = Counter("odpo_gateway_body_too_large_total", "Requests refused with 413: a body over max_body_bytes.")

KNOWN_ALIASES = (POLICY_ALIAS, BASE_MODEL_NAME)
ACCESS = logging.getLogger("odpo.access")
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")  # probes and scrapes: access-logged at DEBUG only
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def alias_label(model: object) -> str:
    """A bounded label value for a requested model name."""
    if model in KNOWN_ALIASES:
        return str(model)
    return "version" if isinstance(model, str) and parse_version_name(model) is not None else "other"


class RequestMetrics:
    """Pure ASGI middleware: counts and times every HTTP request by route template, alias and status, gives it
    a request id and writes the access log (logger `odpo.access`, one line per request).

    The request id is the client's `x-request-id` when it is a plain token (up to 128 of A-Z a-z 0-9 . _ -),
    else a new one; it is in `request.state.request_id` (forwarding sends it on to vLLM) and in the response's
    `x-request-id`. A handler sets `request.state.odpo_alias`; streams are timed to their last byte.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500, False]  # status code, observed yet
        state = scope.setdefault("state", {})
        state["request_id"] = request_id = _request_id(scope)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not status[1]:
                status[1] = True
                _observe(scope, state, status[0], started)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not status[1]:  # a crash, or a client that went away mid-stream
                _observe(scope, state, status[0], started)


def _request_id(scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def _observe(scope, state, status: int, started: float) -> None:
    route = scope.get("route")
    path = getattr(route, "path", None) or "other"
    alias = state.get("odpo_alias", "-")
    code = str(status)
    seconds = time.perf_counter() - started
    key_id = state.get("key_id")
    REQUESTS.labels(path, alias, code).inc()
    LATENCY.labels(path, alias, code).observe(seconds)
    KEY_REQUESTS.labels(key_id or "-", code).inc()
    client = scope.get("client")
    ACCESS.log(logging.DEBUG if path in QUIET_PATHS else logging.INFO, "%s %s %d %.1f ms %s", scope.get("method"), scope.get("path"), status, seconds * 1000,
                state.get("request_id"), extra={
                    "request_id": state.get("request_id"), "method": scope.get("method"), "path": scope.get("path"),
                    "status": status, "duration_ms": round(seconds * 1000, 1), "model": alias,
                    "client": client[0] if client else None, "key_id": key_id})


def sync_promoted(book) -> None:
    """Set the gauges of what this replica serves as `policy` from its copy of the gate's registry."""
    POLICY_VERSION.set(book.promoted)
    PINNED.set(1 if book.pinned else 0)


for _reason in ("queue_full", "broker_error"):
    SERVED_UNPUBLISHED.labels(_reason)  # zeros from the start
