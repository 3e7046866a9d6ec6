"""The gate's app: settings -> lifespan (registry, its file and store holds, the control-topic writer, the
promotion gate) -> routes (admin API, /healthz, /readyz, /metrics).

One gate runs (see service/gate/control.py for what happens if two do). It
needs the serving engine (to score versions and make them servable before
promoting them), the adapter store and the broker; it serves no client
traffic, so its port is for operators and Prometheus only.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.adapter_store import HOLDS_DIR, hold_versions
from core.bus import configure_kafka
from core.contracts import version_name
from core.settings import CommonSettings, GateSettings
from core.topics import topic_name
from service.gate import admin
from service.gate.control import GateControl
from service.gate.metrics import ScoreGauge, sync_promoted
from service.gate.promotion import PromotionGate
from service.gate.registry_file import RegistryFile
from service.gate.state import GateState, state_of
from service.gateway.engine import ModelRouter, engine_access
from service.gateway.protocol import error, json_errors
from service.registry.book import VersionBook

log = logging.getLogger(__name__)

REGISTRY_FILE = "gate-registry.json"
COMPONENT_HOLD = "gate"  # owner name of the gate's hold on versions in the adapter store
EARLIER = ("gateway-registry.json", "gateway")  # file and hold of odpo before the gate was its own component


def create_gate_app(settings: GateSettings, common: CommonSettings | None = None, promote: bool = True) -> FastAPI:
    """The gate; `promote=False` leaves out the promotion thread (versions are recorded and published, but only
    an operator promotes: tests of the admin API and of the readers)."""
    common = common or CommonSettings()
    configure_kafka(common)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        clients, adapters = engine_access(settings, common.store_dir)
        try:
            book = VersionBook(settings.promotion_tolerance)
            scores = ScoreGauge(settings.score_versions_kept)
            registry = _keep_in_file(book, settings, common, scores) if settings.persist_registry else None
            _hold_in_store(book, settings, common)
            control = GateControl(book, common.bootstrap_servers, topic_name(settings.control_topic), scores,
                                  evaluation(settings), registry).attach()
            app.state.gate = GateState(settings=settings, common=common, clients=clients, book=book,
                                       router=ModelRouter(clients, book, adapters, settings.models_refresh_s),
                                       scores=scores, control=control)
            sync_promoted(book)
            control.start()
            gate = PromotionGate(book, adapters, settings, common.bootstrap_servers, scores, common,
                                 term=lambda: control.term).start() if promote else None
            try:
                yield
            finally:
                if gate:
                    await anyio.to_thread.run_sync(gate.stop)
                await anyio.to_thread.run_sync(control.stop)
                adapters.close()
        finally:
            await clients.aclose()

    app = FastAPI(title="odpo gate", version="1", lifespan=lifespan,
                  description="The promotion gate of odpo: the policy registry's one writer and its admin API.")
    json_errors(app)
    app.include_router(admin.router)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Not writing the registry yet, or fenced (JSON body)"}})
    async def readyz(request: Request):
        state = state_of(request)
        view = state.control.view()
        if not view["writing"]:
            why = ("a newer gate writes the registry: this one decides nothing" if view["role"] == "fenced" else
                   f"reading the control topic ({view['role']})")
            return error(503, why, "unavailable")
        return {"status": "ready", "promoted": state.book.promoted, "name": version_name(state.book.promoted),
                "pinned": state.book.pinned, "control": view}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def evaluation(settings: GateSettings) -> dict:
    """How versions are scored: scores are comparable only under the same prompts, answer length and rows
    (task version, fluency signal)."""
    from service.task import TASK_VERSION

    return {"heldout_prompts": settings.heldout_prompts, "heldout_prompts_max": settings.heldout_prompts_max,
            "eval_max_tokens": settings.eval_max_tokens, "task_version": TASK_VERSION,
            "reference_logprob": settings.reference_logprob}


def _keep_in_file(book: VersionBook, settings: GateSettings, common: CommonSettings,
                  scores: ScoreGauge) -> RegistryFile:
    path = settings.registry_file or common.store_dir / REGISTRY_FILE
    earlier = common.store_dir / EARLIER[0]
    if settings.registry_file is None and not path.exists() and earlier.exists():  # a store of an earlier odpo
        earlier.rename(path)
        log.warning("gate: took over the registry the gateway kept (%s -> %s)", earlier, path)
    registry = RegistryFile(path, evaluation(settings))
    if registry.attach(book):
        for rec in book.snapshot()["versions"]:
            if rec["score"] is not None:
                scores.set(rec["version"], rec["score"], rec.get("signals"))
    return registry


def _hold_in_store(book: VersionBook, settings: GateSettings, common: CommonSettings) -> None:
    """Keep the promoted version and the last `hold_history` earlier ones out of the store's retention,
    so a rollback finds its files; rewritten on every change of the book."""
    saved = book.on_change

    def hold() -> None:
        state = book.export_state()
        versions = {state["promoted"], *state["history"][-(settings.hold_history + 1):]} - {0}
        try:
            hold_versions(common.store_dir, COMPONENT_HOLD, versions)
        except OSError as exc:  # retention then keeps only the trainer's newest versions; a later change retries
            log.error("could not record the gate's versions in %s: %s", common.store_dir, exc)
        if saved is not None:
            saved()

    book.on_change = hold
    hold()
    with contextlib.suppress(OSError):  # the gateway's hold in a store of an earlier odpo: the gate's now
        (common.store_dir / HOLDS_DIR / f"{EARLIER[1]}.json").unlink(missing_ok=True)
