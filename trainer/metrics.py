"""Prometheus metrics of the trainer (default registry, served by `service.runtime.serve_metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LOSS = Gauge("odpo_trainer_loss", "Mean DPO loss of the window at the last optimizer step.")
REWARD_MARGIN = Gauge("odpo_trainer_reward_margin", "Mean beta*(chosen - rejected) implicit reward margin.")
REWARD_ACCURACY = Gauge("odpo_trainer_reward_accuracy_ratio", "Share of window pairs whose chosen reward wins.")
REWARD_CHOSEN = Gauge("odpo_trainer_reward_chosen", "Mean implicit reward of chosen completions.")
REWARD_REJECTED = Gauge("odpo_trainer_reward_rejected", "Mean implicit reward of rejected completions.")
POLICY_VERSION = Gauge("odpo_trainer_policy_version", "Newest policy version published by the trainer.")
BUFFERED = Gauge("odpo_trainer_buffered_pairs", "Pairs waiting for the next rolling update.")

PAIRS_CONSUMED = Counter("odpo_trainer_pairs_consumed_total", "Valid preference pairs read from Kafka.")
PAIRS_TRAINED = Counter("odpo_trainer_pairs_trained_total", "Pairs trained in a published update.")
PAIRS_DROPPED = Counter("odpo_trainer_pairs_dropped_total", "Pairs not trained, by reason.", ["reason"])
NAN_SKIPS = Counter("odpo_trainer_nan_skips_total", "Optimizer steps skipped for a non-finite loss or gradient.")
WINDOWS = Counter("odpo_trainer_windows_total", "Rolling updates, by outcome.", ["outcome"])

STEP_SECONDS = Histogram("odpo_trainer_step_seconds", "Wall time of one optimizer step over a window.",
                         buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
WINDOW_SECONDS = Histogram("odpo_trainer_window_seconds", "Wall time of one rolling update (reference + steps).",
                           buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 2400))
CHECKPOINT_SECONDS = Histogram("odpo_trainer_checkpoint_seconds", "Writing, renaming and hashing one version.",
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
STALENESS = Histogram("odpo_trainer_pair_staleness_versions", "Trainer version minus the pair's policy version.",
                      buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32))

DROP_REASONS = ("duplicate", "stale", "future_version", "untrainable", "nonfinite")
for _reason in DROP_REASONS:  # export every series from the start so rate() works at once
    PAIRS_DROPPED.labels(_reason)
for _outcome in ("published", "nonfinite"):
    WINDOWS.labels(_outcome)
