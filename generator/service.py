"""The generator process: vLLM + adapter hot swap + the sampler loop (odpo.prompts -> odpo.candidates)."""

from __future__ import annotations

import logging
import os
import threading

import httpx

from generator.adapters import AdapterManager
from generator.crash_cause import CrashCause
from generator.loop import SamplerLoop
from generator.sampler import Sampler
from generator.server import ServerError, Supervisor, VllmServer
from generator.watcher import AdapterWatcher
from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter
from core.assets import base_model_dir
from core.bus import Inbox, configure_kafka, ensure_topics, make_producer
from core.contracts import TOPIC_ADAPTERS, TOPIC_PROMPTS, AdapterReady, PromptEvent
from core.runtime import EXIT_CAUSE, serve_metrics
from core.settings import CommonSettings, GeneratorSettings
from core.topics import topic_name

log = logging.getLogger(__name__)

COMPONENT = "generator"


def run(common: CommonSettings, settings: GeneratorSettings, stop: threading.Event) -> None:
    """Serve the newest policy and sample every prompt until `stop` is set; stops vLLM on exit."""
    configure_kafka(common)
    metrics_port = serve_metrics(settings.metrics_port, common.metrics_host)
    log.info("generator metrics on %s:%d/metrics", common.metrics_host, metrics_port)
    model_dir = base_model_dir(common.cache_dir, common.base_model)
    log_file = settings.log_file or common.cache_dir / "logs" / f"vllm-{os.getpid()}.log"
    server = VllmServer(model_dir, settings, log_file=log_file, lora_store=common.store_dir).start()
    log.info("vLLM's own metrics on %s/metrics", server.url)
    halt = threading.Event()  # ends the helper threads however the main loop ends
    threads: list[threading.Thread] = []
    closers: list = []
    try:
        # the sampler, the adapter loader and the watcher: with vLLM's API key when it has one
        client = httpx.Client(base_url=server.url, timeout=30.0, headers=settings.vllm_headers())
        closers.append(client.close)
        adapters = AdapterManager(client, common.store_dir, model_dir)
        # The zero adapter goes where this pod's vLLM reads it: the cache for the vLLM started here (the generator
        # then only reads the store, which Kubernetes may mount read-only), the shared store for a vLLM elsewhere.
        zero_home = common.store_dir if settings.vllm_url else common.cache_dir
        adapters.register_base(write_zero_adapter(model_dir, zero_home / ZERO_ADAPTER_DIR,
                                                  r=min(8, settings.max_lora_rank)))

        ensure_topics(common.bootstrap_servers)
        producer = make_producer(common.bootstrap_servers)
        closers.append(producer.close)
        adapter_inbox = Inbox(common.bootstrap_servers, topic_name(TOPIC_ADAPTERS), AdapterReady, COMPONENT, producer,
                              group_id=None)
        closers.append(adapter_inbox.close)
        watcher = AdapterWatcher(adapter_inbox, adapters, common.store_dir, settings.store_check_s)
        died: list[tuple[CrashCause, str]] = []

        def exit_on_death(cause: CrashCause, tail: str) -> None:
            died.append((cause, tail))
            stop.set()

        # Supervised from here on: a vLLM that dies during the catch-up must not leave it retrying forever.
        supervisor = Supervisor(server, adapters.resync, on_death=None if settings.restart_server else exit_on_death)
        threads.append(threading.Thread(target=supervisor.run, args=(halt,), name="odpo-vllm-supervisor",
                                        daemon=True))
        threads[-1].start()
        watcher.catch_up(stop)
        log.info("serving version %d before sampling", adapters.current_version)
        threads.append(threading.Thread(target=watcher.run, args=(halt,), name="odpo-adapter-watcher", daemon=True))
        threads[-1].start()

        if not stop.is_set():
            from transformers import AutoTokenizer  # heavy import, only once vLLM is up

            sampler = Sampler(client, AutoTokenizer.from_pretrained(model_dir), adapters, settings)
            prompt_inbox = Inbox(common.bootstrap_servers, topic_name(TOPIC_PROMPTS), PromptEvent, COMPONENT, producer,
                                 group_id=settings.group_id, max_poll_records=settings.max_in_flight)
            closers.append(prompt_inbox.close)
            SamplerLoop(prompt_inbox, sampler, producer, settings.max_in_flight, settings.max_request_attempts,
                        stop).run()
        if died:
            cause, tail = died[0]
            log.error("%svLLM died (%s): %s", EXIT_CAUSE, cause.kind, cause)
            raise ServerError(f"vLLM died ({cause}) and restart_server is off: the generator exits so that its "
                              f"supervisor restarts it. vLLM's last log lines:\n{tail}")
    finally:
        halt.set()
        for t in threads:
            t.join(timeout=30)
        for close in reversed(closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing must go on to stop vLLM
                log.exception("closing %s", close)
        server.stop()
        log.info("generator stopped")
