"""Prometheus metrics of the trainer (default registry, served by `core.runtime.serve_metrics`).

The gauges of an update mirror what TRL's DPOTrainer logs (rewards/*, logps/*,
logits/*, loss, grad_norm, learning_rate), taken at the last optimizer step
of the newest published window.
"""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram

LOSS = Gauge("odpo_trainer_loss", "DPO loss of the last optimizer step of the newest window.")
REWARD_MARGIN = Gauge("odpo_trainer_reward_margin", "Mean beta*(chosen - rejected) implicit reward margin.")
DRIFT = Gauge("odpo_trainer_drift_per_token", "Mean per-token log-ratio sampler/reference of the newest window's "
              "sampled responses: an estimate of KL(served policy || reference) per token.")
BETA = Gauge("odpo_trainer_beta", "DPO beta of the newest update (adapted to the drift when kl_target is set).")
REWARD_ACCURACY = Gauge("odpo_trainer_reward_accuracy_ratio", "Share of step pairs whose chosen reward wins.")
REWARD_CHOSEN = Gauge("odpo_trainer_reward_chosen", "Mean implicit reward of chosen completions.")
REWARD_REJECTED = Gauge("odpo_trainer_reward_rejected", "Mean implicit reward of rejected completions.")
LOGPS = Gauge("odpo_trainer_logps_nats", "Mean summed policy log-prob of a completion, by side.", ["side"])
LOGITS = Gauge("odpo_trainer_logits_mean", "Mean logit over the vocabulary per completion token, by side.", ["side"])
GRAD_NORM = Gauge("odpo_trainer_grad_norm", "Gradient norm before clipping, last optimizer step.")
LEARNING_RATE = Gauge("odpo_trainer_learning_rate", "Scheduled learning rate of the last optimizer step.")
POLICY_VERSION = Gauge("odpo_trainer_policy_version", "Newest policy version published by the trainer.")
BUFFERED = Gauge("odpo_trainer_buffered_pairs", "Pairs waiting for the next rolling update.")
PAIRS_PER_SECOND = Gauge("odpo_trainer_pairs_per_second", "Pairs of the newest window / its update's wall time.")
LOGPROB_MISMATCH = Gauge(
    "odpo_trainer_logprob_mismatch",
    "Mean |trainer - sampler| per-token log-prob (nats) of the newest window's on-policy pairs "
    "(sampled by the version the trainer held); float32 vLLM and HF agree to ~1e-5.")

PAIRS_CONSUMED = Counter("odpo_trainer_pairs_consumed_total", "Valid preference pairs read from Kafka.")
PAIRS_TRAINED = Counter("odpo_trainer_pairs_trained_total", "Pairs trained in a published update.")
PAIRS_DROPPED = Counter("odpo_trainer_pairs_dropped_total", "Pairs not trained, by reason.", ["reason"])
NAN_SKIPS = Counter("odpo_trainer_nan_skips_total", "Optimizer steps skipped for a non-finite loss or gradient.")
WINDOWS = Counter("odpo_trainer_windows_total", "Rolling updates, by outcome.", ["outcome"])
REPUBLISHED = Counter("odpo_trainer_adapters_republished_total",
                      "AdapterReady sent again at start for a version stored but never announced (a crash).")
PAIRS_ARCHIVED = Counter("odpo_trainer_pairs_archived_total",
                         "Pairs written (fsynced) to the store's pair archive, once per pair id per process.")
ARCHIVE_ERRORS = Counter("odpo_trainer_archive_errors_total",
                         "Failed writes to the pair archive (e.g. a full disk); offsets stay uncommitted meanwhile.")
ARCHIVE_PENDING = Gauge("odpo_trainer_archive_pending_pairs", "Pairs read but not yet durable in the pair archive.")
VERSIONS_DELETED = Counter("odpo_trainer_versions_deleted_total",
                           "Versions retention deleted from the store (neither among the newest nor held).")
TRACKING_ERRORS = Counter("odpo_trainer_tracking_errors_total",
                          "Failed calls to an experiment tracker (report_to: trainer/tracking.py); training goes on.",
                          ["backend"])
STORE_BYTES = Gauge("odpo_trainer_store_bytes", "Bytes in the adapter store after the newest publish, by part.",
                    ["part"])

STEP_SECONDS = Histogram("odpo_trainer_step_seconds", "Wall time of one optimizer step over a window.",
                         buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
WINDOW_SECONDS = Histogram("odpo_trainer_window_seconds", "Wall time of one rolling update (reference + steps).",
                           buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 2400))
CHECKPOINT_SECONDS = Histogram("odpo_trainer_checkpoint_seconds", "Writing, renaming and hashing one version.",
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
STALENESS = Histogram("odpo_trainer_pair_staleness_versions", "Trainer version minus the pair's policy version.",
                      buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32))
PAIR_LOGPROB_MISMATCH = Histogram(
    "odpo_trainer_pair_logprob_mismatch", "Per on-policy pair: mean |trainer - sampler| per-token log-prob (nats).",
    buckets=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5, 1, 5))

DROP_REASONS = ("duplicate", "stale", "future_version", "untrainable", "nonfinite")
for _reason in DROP_REASONS:  # export every series from the start so rate() works at once
    PAIRS_DROPPED.labels(_reason)
for _outcome in ("published", "nonfinite"):
    WINDOWS.labels(_outcome)
for _side in ("chosen", "rejected"):
    LOGPS.labels(_side)
    LOGITS.labels(_side)


def record_window(result) -> None:
    """Export what a finished update (a `WindowResult`) measured, published or not."""
    for s in result.step_seconds:
        STEP_SECONDS.observe(s)
    NAN_SKIPS.inc(result.skipped)
    WINDOW_SECONDS.observe(result.seconds)
    if result.seconds > 0:
        PAIRS_PER_SECOND.set(result.pairs / result.seconds)
    for m in result.logprob_mismatch:
        PAIR_LOGPROB_MISMATCH.observe(m)
    if result.logprob_mismatch:
        LOGPROB_MISMATCH.set(sum(result.logprob_mismatch) / len(result.logprob_mismatch))


# The gauges of the update that became the newest version: (metric, label value or None, WindowResult field).
_PUBLISHED = ((LOSS, None, "loss"), (REWARD_MARGIN, None, "reward_margin"),
              (REWARD_ACCURACY, None, "reward_accuracy"), (REWARD_CHOSEN, None, "reward_chosen"),
              (REWARD_REJECTED, None, "reward_rejected"), (LOGPS, "chosen", "logps_chosen"),
              (LOGPS, "rejected", "logps_rejected"), (LOGITS, "chosen", "logits_chosen"),
              (LOGITS, "rejected", "logits_rejected"), (GRAD_NORM, None, "grad_norm"),
              (LEARNING_RATE, None, "learning_rate"), (DRIFT, None, "drift"), (BETA, None, "beta"))


def record_published(result) -> None:
    """The training gauges of the update that became the newest version."""
    for metric, label, field in _PUBLISHED:
        (metric.labels(label) if label else metric).set(getattr(result, field))


def sample_name(metric) -> str:
    """The name /metrics shows a metric's samples under (a counter's with `_total`)."""
    family = metric.describe()[0]
    return family.name + ("_total" if family.type == "counter" else "")


def tracked_values(result, version: int, pairs_trained: int) -> dict[str, float]:
    """What an experiment tracker logs for the window that made `version` (trainer/tracking.py): the values
    the Prometheus gauges take for it, under their /metrics names; a labelled series as `name/label`
    (`odpo_trainer_logps_nats/chosen`); `odpo_trainer_window_seconds` is the window's observation of the
    histogram and `odpo_trainer_pairs_trained_total` the pairs the version has trained in all (its ledger).
    Values not measured (NaN) are left out."""
    values = {sample_name(metric) + (f"/{label}" if label else ""): getattr(result, field)
              for metric, label, field in _PUBLISHED}
    values[sample_name(POLICY_VERSION)] = version
    values[sample_name(PAIRS_TRAINED)] = pairs_trained
    values[sample_name(WINDOW_SECONDS)] = result.seconds
    if result.seconds > 0:
        values[sample_name(PAIRS_PER_SECOND)] = result.pairs / result.seconds
    if result.logprob_mismatch:
        values[sample_name(LOGPROB_MISMATCH)] = sum(result.logprob_mismatch) / len(result.logprob_mismatch)
    return {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
