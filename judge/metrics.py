"""The judge's Prometheus metrics (`odpo_judge_*`); label values are bounded sets."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

DROP_REASONS = ("tie", "margin", "duplicate", "length", "identical", "cap", "degenerate", "collapse")
GUARD_REASONS = ("empty", "too_short", "repetitive", "off_topic", "disfluent")
PLUGINS = ("verifier", "reward_model", "llm_judge", "human")
LLM_OUTCOMES = ("consistent", "inconsistent", "no_verdict")

CANDIDATE_SETS = Counter("odpo_judge_candidate_sets_total",
                         "Candidate sets judged, the unjudgeable (dead-lettered) included; a set put back "
                         "(judge unavailable) counts once, when judged.")
PAIRS = Counter("odpo_judge_pairs_total", "Preference pairs published to odpo.preferences.", ["judge"])
DROPPED = Counter("odpo_judge_pairs_dropped_total",
                  "Candidate pairs not published, by reason: tie (no preference), margin (below min_margin), "
                  "duplicate (pair id seen before), length (length guard), identical (same text), "
                  "cap (over max_pairs_per_prompt), degenerate (the chosen failed the quality guard), "
                  "collapse (the chosen won by being much shorter).", ["reason"])
GUARD_FAILURES = Counter("odpo_judge_guard_failures_total",
                         "Judged responses the quality guard failed (never chosen), by reason: empty, too_short, "
                         "repetitive, off_topic, disfluent.", ["reason"])
REGEX_TIMEOUTS = Counter("odpo_judge_regex_timeouts_total",
                         "Regex task matches that ran out of their time limit (ODPO_JUDGE_REGEX_TIMEOUT_S); each "
                         "such answer scored 0.")
DEAD_LETTERS = Counter("odpo_judge_dead_letters_total", "Messages sent to odpo.dlq (invalid or unjudgeable).")
UNAVAILABLE = Counter("odpo_judge_unavailable_total", "Batches put back because the judge could not work.")
SCORES = Histogram("odpo_judge_score", "Score of each judged response, by plugin.", ["judge"],
                   buckets=(-4, -2, -1, -0.5, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2, 4))
LATENCY = Histogram("odpo_judge_latency_seconds", "Time to judge one candidate set (or one feedback), by plugin.",
                    ["judge"], buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0))
POLICY_VERSION = Gauge("odpo_judge_policy_version", "Policy version of the last candidate set judged.")
CHOSEN_LONGER = Counter("odpo_judge_pairs_chosen_longer_total",
                        "Published pairs whose chosen response is longer (in characters) than the rejected one.")
CHOSEN_LONGER_RATIO = Gauge("odpo_judge_chosen_longer_ratio",
                            "Share of published pairs (since start) whose chosen response is the longer one.")
LLM_COMPARISONS = Counter("odpo_judge_llm_comparisons_total",
                          "LLM-judge comparisons (each asked in both orders), by outcome.", ["outcome"])
LLM_CONSISTENCY = Gauge("odpo_judge_llm_position_consistency_ratio",
                        "Share of LLM-judge comparisons with a verdict in both orders (since start) whose verdict "
                        "survived swapping the order.")
LLM_RETRIES = Counter("odpo_judge_llm_retries_total", "Retried requests to the LLM-judge endpoint.")
FEEDBACK = Counter("odpo_judge_feedback_total", "Valid feedback messages received, by kind.", ["kind"])
FEEDBACK_UNPAIRED = Counter("odpo_judge_feedback_unpaired_total",
                            "Ratings that made no pair: neutral (rating 0) or evicted (no opposite rating came "
                            "before the buffer bound or age limit).", ["reason"])
FEEDBACK_BUFFERED = Gauge("odpo_judge_feedback_buffered", "Ratings waiting for an opposite rating of the same prompt.")

for _r in DROP_REASONS:
    DROPPED.labels(_r)  # export zeros, so rate() works before the first event
for _g in GUARD_REASONS:
    GUARD_FAILURES.labels(_g)
for _p in PLUGINS:
    PAIRS.labels(_p)
for _o in LLM_OUTCOMES:
    LLM_COMPARISONS.labels(_o)
for _k in ("rating", "choice"):
    FEEDBACK.labels(_k)
for _u in ("neutral", "evicted"):
    FEEDBACK_UNPAIRED.labels(_u)

_lock = threading.Lock()
_counts = {"pairs": 0, "longer": 0, "comparisons": 0, "consistent": 0}


def observe_pair(judge: str, chosen: str, rejected: str) -> None:
    """Count one published pair, and whether its chosen response is the longer one."""
    PAIRS.labels(judge).inc()
    longer = len(chosen.strip()) > len(rejected.strip())
    if longer:
        CHOSEN_LONGER.inc()
    with _lock:
        _counts["pairs"] += 1
        _counts["longer"] += longer
        CHOSEN_LONGER_RATIO.set(_counts["longer"] / _counts["pairs"])


def observe_llm_comparison(outcome: str) -> None:
    LLM_COMPARISONS.labels(outcome).inc()
    with _lock:
        if outcome == "no_verdict":  # says nothing about position bias
            return
        _counts["comparisons"] += 1
        _counts["consistent"] += outcome == "consistent"
        LLM_CONSISTENCY.set(_counts["consistent"] / _counts["comparisons"])
