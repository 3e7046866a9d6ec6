"""The gate's Prometheus metrics (`odpo_gate_*`): its decisions, the held-out scores, whether it writes.

Label values stay bounded: `trigger` and `reason` come from fixed sets, the
per-version gauges keep only the newest `score_versions_kept` versions.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

PROMOTED_VERSION = Gauge("odpo_gate_promoted_version", "Version the gate has promoted (what `policy` resolves to).")
PINNED = Gauge("odpo_gate_pinned", "1 while an operator has pinned the promoted version.")
HELDOUT_SCORE = Gauge("odpo_gate_heldout_score", "Held-out score of a version (newest versions only).",
                      ["policy_version"])
PROMOTED_SCORE = Gauge("odpo_gate_promoted_heldout_score", "Held-out score of the promoted version.")
PROMOTIONS = Counter("odpo_gate_promotions_total", "Changes of the promoted version, by what caused them.",
                     ["trigger"])
REFUSALS = Counter("odpo_gate_promotion_refusals_total", "Versions the gate did not promote, by reason.",
                   ["reason"])
REFUSED_BY = Counter("odpo_gate_refusals_by_signal_total",
                     "Versions the gate refused, by the signal that refused them: score, or a quality signal "
                     "(mean_words, empty_share, distinct2, on_topic_share, ref_logprob, guard_pass).", ["signal"])
HELDOUT_SIGNAL = Gauge("odpo_gate_heldout_signal",
                       "Held-out evaluation signals of a version (newest versions only): score, strict_pass, "
                       "mean_words, empty_share, distinct2, on_topic_share, ref_logprob, guard_pass, prompts, and "
                       "score_diff_low/score_diff_high (95% interval of the paired difference to the version "
                       "promoted when it was scored).", ["policy_version", "signal"])
GATE_SIGNALS = ("score", "strict_pass", "mean_words", "empty_share", "distinct2", "on_topic_share", "ref_logprob",
                "guard_pass")
EVAL_SECONDS = Histogram("odpo_gate_eval_seconds", "Time to score one version on the held-out prompts.",
                         buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600))
WRITING = Gauge("odpo_gate_writing", "1 while this gate writes the registry (its claim of the newest epoch is read "
                "back), 0 while it starts or after another gate claimed a newer epoch (then it decides nothing).")


class ScoreGauge:
    """`odpo_gate_heldout_score{policy_version}` and its signals for the newest `keep` versions only."""

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


def sync_promoted(book) -> None:
    """Set the promoted-version gauges from the book (after any change of promotion or pin)."""
    PROMOTED_VERSION.set(book.promoted)
    PINNED.set(1 if book.pinned else 0)
    rec = book.record(book.promoted)
    if rec is not None and rec.score is not None:
        PROMOTED_SCORE.set(rec.score)


for _signal in ("score", *GATE_SIGNALS[2:]):
    REFUSED_BY.labels(_signal)  # zeros from the start, so increase() sees the first refusal
