"""The gateway app: settings -> lifespan (engine client, policy registry, promotion gate, Kafka outbox) -> routes.

No torch here (the gateway stays light). Errors are OpenAI-shaped JSON
bodies (`{"error": {"message", "type", "code"}}`), never tracebacks.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.adapter_store import hold_versions
from service.gateway import admin, feedback, forwarding, health
from service.gateway.book import VersionBook
from service.gateway.control import ControlPlane
from service.gateway.endpoints import EnginePool, engine_urls
from service.gateway.engine import EngineAdapters, EngineClients, ModelRouter
from service.gateway.gate import PromotionGate
from service.gateway.metrics import RequestMetrics, ScoreGauge, sync_promoted
from service.gateway.outbox import Outbox
from service.gateway.protocol import error
from service.gateway.registry_file import RegistryFile
from service.gateway.served import ServedStore
from service.gateway.served_log import ServedLog
from service.gateway.state import BrokerCheck, GatewayState
from core.settings import CommonSettings, GatewaySettings

log = logging.getLogger(__name__)

REGISTRY_FILE = "gateway-registry.json"
COMPONENT_HOLD = "gateway"  # owner name of the gateway's hold on versions in the adapter store
ERROR_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
               503: "unavailable"}


def create_app(settings: GatewaySettings, common: CommonSettings | None = None, gate: bool = True) -> FastAPI:
    """The gateway; `gate=False` leaves out the promotion gate (`base` stays promoted unless an operator acts)."""
    common = common or CommonSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool = EnginePool(engine_urls(settings.vllm_url), settings.vllm_resolve_dns, down_s=settings.engine_down_s)
        clients = EngineClients(settings.request_timeout_s)
        try:
            book = VersionBook(settings.promotion_tolerance)
            scores = ScoreGauge(settings.score_versions_kept)
            registry = _keep_in_file(book, settings, common, scores) if settings.persist_registry else None
            _hold_in_store(book, settings, common)
            adapters = EngineAdapters(pool, common.store_dir)
            control = ControlPlane(book, settings, common.bootstrap_servers, scores, _evaluation(settings),
                                   registry).attach() \
                if settings.control_plane else None
            outbox = Outbox(common.bootstrap_servers, settings.mirror_queue_size, settings.publish_timeout_s).start()
            served = ServedStore(settings.served_capacity)
            served_log = ServedLog(common.bootstrap_servers, served, outbox, settings.served_retention_s).start()
            app.state.gateway = GatewayState(
                settings=settings, common=common, clients=clients, book=book, adapters=adapters,
                router=ModelRouter(clients, book, adapters, settings.models_refresh_s),
                served=served, served_log=served_log, outbox=outbox, scores=scores,
                broker=BrokerCheck(common.bootstrap_servers, settings.broker_check_s), control=control)
            sync_promoted(book)
            if control:
                control.start()
            promotion = PromotionGate(book, adapters, settings, common.bootstrap_servers, scores, common,
                                      leading=(lambda: control.term) if control else None).start() \
                if gate else None
            try:
                yield
            finally:
                if promotion:
                    await anyio.to_thread.run_sync(promotion.stop)
                if control:
                    await anyio.to_thread.run_sync(control.stop)
                await anyio.to_thread.run_sync(served_log.stop)
                await anyio.to_thread.run_sync(outbox.close)
                adapters.close()
        finally:
            await clients.aclose()

    app = FastAPI(title="odpo gateway", version="1", lifespan=lifespan,
                  description="OpenAI-compatible front door of odpo, feedback, and the policy promotion gate.")
    app.add_middleware(RequestMetrics)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), ERROR_KINDS.get(exc.status_code, "invalid_request_error"),
                     headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error(400, "the request body is not valid JSON")
        return error(400, "; ".join(_describe(e) for e in errors[:5]))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error(500, f"internal error: {exc.__class__.__name__}", "internal_error")

    for module in (health, forwarding, feedback, admin):
        app.include_router(module.router)
    return app


def _evaluation(settings: GatewaySettings) -> dict:
    """How versions are scored: scores are comparable only under the same prompts, answer length and rows
    (task version, fluency signal)."""
    from service.task import TASK_VERSION

    return {"heldout_prompts": settings.heldout_prompts, "heldout_prompts_max": settings.heldout_prompts_max,
            "eval_max_tokens": settings.eval_max_tokens, "task_version": TASK_VERSION,
            "reference_logprob": settings.gate_reference_logprob}


def _keep_in_file(book: VersionBook, settings: GatewaySettings, common: CommonSettings,
                  scores: ScoreGauge) -> RegistryFile:
    path = settings.registry_file or common.store_dir / REGISTRY_FILE
    registry = RegistryFile(path, _evaluation(settings))
    if registry.attach(book):
        for rec in book.snapshot()["versions"]:
            if rec["score"] is not None:
                scores.set(rec["version"], rec["score"], rec.get("signals"))
    return registry


def _hold_in_store(book: VersionBook, settings: GatewaySettings, common: CommonSettings) -> None:
    """Keep the promoted version and the last `hold_history` earlier ones out of the store's retention,
    so a rollback finds its files; rewritten on every change of the book."""
    saved = book.on_change

    def hold() -> None:
        state = book.export_state()
        versions = {state["promoted"], *state["history"][-(settings.hold_history + 1):]} - {0}
        try:
            hold_versions(common.store_dir, COMPONENT_HOLD, versions)
        except OSError as exc:  # retention then keeps only the trainer's newest versions; a later change retries
            log.error("could not record the gateway's versions in %s: %s", common.store_dir, exc)
        if saved is not None:
            saved()

    book.on_change = hold
    hold()


def _describe(err: dict) -> str:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    return f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
