"""The gateway app: settings -> lifespan (engine client, the registry as the gate decides it, Kafka outbox) ->
routes.

A gateway replica holds no decision of its own: it reads the gate's
decisions from the control topic (service/registry/follower.py) and routes
`policy` to the version the newest one names, so any number of replicas run
side by side and a restarted one routes like the others once it has read the
topic. With `api_keys_file` every `/v1/*` request needs a client key with
the route's scope (service/gateway/keys.py); bodies are capped
(body_limit.py). No torch here (the gateway stays light). Errors are OpenAI-shaped JSON
bodies (`{"error": {"message", "type", "code"}}`), never tracebacks.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from prometheus_client import start_http_server

from core.bus import configure_kafka
from core.settings import CommonSettings, GatewaySettings
from core.topics import topic_name
from service.gateway import feedback, forwarding, health
from service.gateway.body_limit import BodyLimit
from service.gateway.engine import ModelRouter, engine_access
from service.gateway.keys import ClientKeys, FeedbackCaps, KeyLimits, KeyRing
from service.gateway.metrics import RequestMetrics, sync_promoted
from service.gateway.outbox import Outbox
from service.gateway.protocol import json_errors
from service.gateway.served import ServedStore
from service.gateway.served_log import ServedLog
from service.gateway.state import BrokerCheck, GatewayState
from service.registry.book import VersionBook
from service.registry.follower import RegistryFollower

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings, common: CommonSettings | None = None) -> FastAPI:
    common = common or CommonSettings()
    configure_kafka(common)
    ring = KeyRing(settings.api_keys_file, settings.api_keys_check_s) if settings.api_keys_file else None
    if ring is None:
        log.info("client API keys off (ODPO_GATEWAY_API_KEYS_FILE unset): every client may use every route")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        clients, adapters = engine_access(settings, common.store_dir)
        try:
            book = VersionBook(0.0)  # a copy of the gate's: its promotion rules never run here
            registry = RegistryFollower(book, common.bootstrap_servers, topic_name(settings.control_topic),
                                        f"gateway-{socket.gethostname()}-{os.getpid()}",
                                        on_applied=lambda head: sync_promoted(book))
            outbox = Outbox(common.bootstrap_servers, settings.mirror_queue_size, settings.publish_timeout_s).start()
            served = ServedStore(settings.served_capacity)
            served_log = ServedLog(common.bootstrap_servers, served, outbox, settings.served_retention_s).start()
            app.state.gateway = GatewayState(
                settings=settings, common=common, clients=clients, book=book, adapters=adapters,
                router=ModelRouter(clients, book, adapters, settings.models_refresh_s,
                                   unknown_cache_s=settings.unknown_model_cache_s,
                                   serve_refused=settings.serve_refused_versions),
                keys=ring, feedback_caps=FeedbackCaps(settings.served_capacity),
                served=served, served_log=served_log, outbox=outbox,
                broker=BrokerCheck(common.bootstrap_servers, settings.broker_check_s), registry=registry)
            sync_promoted(book)
            registry.start()
            metrics_server = None
            if settings.metrics_port is not None:  # /metrics off the API port (the public Service's)
                metrics_server, _ = start_http_server(settings.metrics_port, addr=common.metrics_host)
                app.state.metrics_port = metrics_server.server_port
                log.info("gateway metrics on %s:%d/metrics", common.metrics_host, metrics_server.server_port)
            try:
                yield
            finally:
                if metrics_server is not None:
                    metrics_server.shutdown()
                    metrics_server.server_close()
                await anyio.to_thread.run_sync(registry.stop)
                await anyio.to_thread.run_sync(served_log.stop)
                await anyio.to_thread.run_sync(outbox.close)
                adapters.close()
        finally:
            await clients.aclose()

    app = FastAPI(title="odpo gateway", version="1", lifespan=lifespan,
                  description="OpenAI-compatible front door of odpo, and feedback.")
    # outermost first: metrics and the access log see every answer; keys refuse before a body is read
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ClientKeys, ring=ring, limits=KeyLimits())
    app.add_middleware(RequestMetrics)
    json_errors(app)
    for module in (health, forwarding, feedback):
        app.include_router(module.router)
    return app
