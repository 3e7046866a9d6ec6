"""The gateway's Prometheus metrics (`odpo_gateway_*`) and the middleware that counts every request.

Label values stay bounded: `route` is a route template (or `other`), `alias`
one of policy/base/version/other/-, `status` an HTTP status, and the
per-version score gauge keeps only the newest `score_versions_kept` versions.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import Counter, Gauge, Histogram

from core.contracts import BASE_MODEL_NAME, POLICY_ALIAS, parse_version_name

REQUESTS = Counter("odpo_gateway_requests_total", "Requests by route, model alias and status.",
                   ["route", "alias", "status"])
LATENCY = Histogram("odpo_gateway_request_seconds",
                    "Request latency by route, model alias and status (to the last byte for streams).",
                    ["route", "alias", "status"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
POLICY_VERSION = Gauge("odpo_gateway_policy_version", "Version the alias `policy` resolves to (the promoted one).")
PINNED = Gauge("odpo_gateway_policy_pinned", "1 while an operator has pinned the promoted version.")
HELDOUT_SCORE = Gauge("odpo_gateway_heldout_score", "Held-out score of a version (newest versions only).",
                      ["policy_version"])
PROMOTED_SCORE = Gauge("odpo_gateway_promoted_heldout_score", "Held-out score of the promoted version.")
PROMOTIONS = Counter("odpo_gateway_promotions_total", "Changes of the promoted version, by what caused them.",
                     ["trigger"])
REFUSALS = Counter("odpo_gateway_promotion_refusals_total", "Versions the gate did not promote, by reason.",
                   ["reason"])
REFUSED_BY = Counter("odpo_gateway_gate_refusals_by_signal_total",
                     "Versions the gate refused, by the signal that refused them: score, or a quality signal "
                     "(mean_words, empty_share, distinct2, on_topic_share, ref_logprob, guard_pass).", ["signal"])
HELDOUT_SIGNAL = Gauge("odpo_gateway_heldout_signal",
                       "Held-out evaluation signals of a version (newest versions only): score, strict_pass, "
                       "mean_words, empty_share, distinct2, on_topic_share, ref_logprob, guard_pass, prompts, and "
                       "score_diff_low/score_diff_high (95% interval of the paired difference to the version "
                       "promoted when it was scored).", ["policy_version", "signal"])
GATE_SIGNALS = ("score", "strict_pass", "mean_words", "empty_share", "distinct2", "on_topic_share", "ref_logprob",
                "guard_pass")
EVAL_SECONDS = Histogram("odpo_gateway_eval_seconds", "Time to score one version on the held-out prompts.",
                         buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600))
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
LEADER = Gauge("odpo_gateway_leader", "1 while this replica leads the gateways (runs the promotion gate; admin "
               "changes are made here), else 0.")
CONTROL_SEQ = Gauge("odpo_gateway_control_seq", "Sequence number of the shared registry state this replica holds "
                    "(replicas that agree show the same number).")
CONTROL_EPOCH = Gauge("odpo_gateway_control_epoch", "Epoch of the newest leader this replica has read on the "
                      "control topic (it rises with every change of leader).")

KNOWN_ALIASES = (POLICY_ALIAS, BASE_MODEL_NAME)


def alias_label(model: object) -> str:
    """A bounded label value for a requested model name."""
    if model in KNOWN_ALIASES:
        return str(model)
    return "version" if isinstance(model, str) and parse_version_name(model) is not None else "other"


class ScoreGauge:
    """`odpo_gateway_heldout_score{policy_version}` for the newest `keep` versions only."""

    def __init__(self, keep: int):
        self.keep = keep
        self._scores: dict[int, float] = {}
        self._lock = threading.Lock()

    def set(self, version: int, score: float, signals: dict | None = None) -> None:
        with self._lock:
            self._scores[version] = score
            HELDOUT_SCORE.labels(str(version)).set(score)
            for name, value in _signal_values(signals or {}).items():
                HELDOUT_SIGNAL.labels(str(version), name).set(value)
            for old in sorted(self._scores)[:-self.keep]:
                del self._scores[old]
                try:
                    HELDOUT_SCORE.remove(str(old))
                except KeyError:
                    pass
                for name in (*GATE_SIGNALS, "prompts", "score_diff_low", "score_diff_high"):
                    try:
                        HELDOUT_SIGNAL.remove(str(old), name)
                    except KeyError:
                        pass


def _signal_values(signals: dict) -> dict[str, float]:
    out = {k: float(signals[k]) for k in GATE_SIGNALS if signals.get(k) is not None}
    if "n" in signals:
        out["prompts"] = float(signals["n"])
    diff = signals.get("score_difference")
    if diff:
        out["score_diff_low"], out["score_diff_high"] = float(diff["low"]), float(diff["high"])
    return out


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
    """Set the promoted-version gauges from the book (after any change of promotion or pin)."""
    POLICY_VERSION.set(book.promoted)
    PINNED.set(1 if book.pinned else 0)
    rec = book.record(book.promoted)
    if rec is not None and rec.score is not None:
        PROMOTED_SCORE.set(rec.score)


for _reason in ("queue_full", "broker_error"):
    SERVED_UNPUBLISHED.labels(_reason)  # zeros from the start
for _signal in ("score", *GATE_SIGNALS[2:]):
    REFUSED_BY.labels(_signal)  # zeros from the start, so increase() sees the first refusal
