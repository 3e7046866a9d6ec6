"""The gateway app: settings -> lifespan (engine client, the registry as the gate decides it, Kafka outbox) ->
routes.

A gateway replica holds no decision of its own: it reads the gate's
decisions from the control topic (service/registry/follower.py) and routes
`policy` to the version the newest one names, so any number of replicas run
side by side and a restarted one routes like the others once it has read the
topic. No torch here (the gateway stays light). Errors are OpenAI-shaped JSON
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
from service.gateway.endpoints import EnginePool, engine_urls
from service.gateway.engine import EngineAdapters, EngineClients, ModelRouter
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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool = EnginePool(engine_urls(settings.vllm_url), settings.vllm_resolve_dns, down_s=settings.engine_down_s)
        vllm_headers = settings.vllm_headers()  # vLLM's API key, when it has one
        clients = EngineClients(settings.request_timeout_s, vllm_headers)
        try:
            book = VersionBook(0.0)  # a copy of the gate's: its promotion rules never run here
            adapters = EngineAdapters(pool, common.store_dir, headers=vllm_headers)
            registry = RegistryFollower(book, common.bootstrap_servers, topic_name(settings.control_topic),
                                        f"gateway-{socket.gethostname()}-{os.getpid()}",
                                        on_applied=lambda head: sync_promoted(book))
            outbox = Outbox(common.bootstrap_servers, settings.mirror_queue_size, settings.publish_timeout_s).start()
            served = ServedStore(settings.served_capacity)
            served_log = ServedLog(common.bootstrap_servers, served, outbox, settings.served_retention_s).start()
            app.state.gateway = GatewayState(
                settings=settings, common=common, clients=clients, book=book, adapters=adapters,
                router=ModelRouter(clients, book, adapters, settings.models_refresh_s),
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
    app.add_middleware(RequestMetrics)
    json_errors(app)
    for module in (health, forwarding, feedback):
        app.include_router(module.router)
    return app
