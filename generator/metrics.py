"""The generator's Prometheus metrics (default registry, created once per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

POLICY_VERSION = Gauge("odpo_generator_policy_version", "Policy version new samples are drawn from (0 = base).")
LOADED_VERSIONS = Gauge("odpo_generator_loaded_versions",
                        "Policy versions registered in vLLM besides base (as vLLM lists them at the last store check).")
UNLOADS = Counter("odpo_generator_unloads_total",
                  "Version names unloaded from vLLM because their folder left the adapter store (retention).")
SWAP_LATENCY = Histogram(
    "odpo_generator_swap_latency_seconds", "From AdapterReady.created_at until vLLM serves the new version.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
SWAP_FAILURES = Counter(
    "odpo_generator_swap_failures_total", "Adapter versions refused or not loaded, by reason.", ["reason"])
PROMPTS = Counter("odpo_generator_prompts_consumed_total", "Valid prompts taken from odpo.prompts.")
PROMPTS_REJECTED = Counter("odpo_generator_prompts_rejected_total", "Prompts dead-lettered by the sampler.")
SAMPLES = Counter("odpo_generator_samples_total", "Completions sampled and published.")
TOKENS = Counter("odpo_generator_tokens_total", "Completion tokens sampled and published.")
IN_FLIGHT = Gauge("odpo_generator_in_flight_requests", "Sampling requests waiting on vLLM.")
REQUEST_LATENCY = Histogram(
    "odpo_generator_request_latency_seconds", "Duration of one successful sampling request (all n samples).",
    buckets=(0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320))
REQUEST_RETRIES = Counter("odpo_generator_request_retries_total", "Sampling requests retried after a server error.")
SERVER_RESTARTS = Counter("odpo_generator_server_restarts_total", "Restarts of a vLLM server that died.")
ENGINE_CRASHES = Counter(
    "odpo_generator_engine_crashes_total",
    "vLLM servers of this generator that died or hung, by the exception vLLM's log names as the cause "
    "(`killed` when it names none: a signal, the OOM killer; `hung`: /health stopped answering).", ["cause"])
STORE_CATCH_UPS = Counter(
    "odpo_generator_store_catch_ups_total",
    "Versions loaded from the adapter store because odpo.adapters did not bring them (the topic lost messages).")
VERSIONS_BEHIND = Gauge(
    "odpo_generator_versions_behind", "Newest version in the adapter store minus the version being served.")
