"""The admin API: list versions with their scores and metrics, read their held-out answers, promote, pin,
unpin, roll back, and which replica leads.

Every route needs `Authorization: Bearer <token>`; the token comes from
`ODPO_GATEWAY_ADMIN_TOKEN` or the file `ODPO_GATEWAY_ADMIN_TOKEN_FILE` (a
Kubernetes Secret mount, read on each request so a rotated secret applies
without a restart) and is compared in constant time. With no token
configured the admin routes answer 404, as if they did not exist.

With several replicas (service/gateway/control.py) the reads answer from
this replica's copy of the shared registry, and the changes are made by the
leader: a follower forwards them (service/gateway/leader_forward.py) and
answers once its own copy holds the result.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

import anyio
import httpx
from fastapi import APIRouter, Depends, HTTPException, Request

from core.contracts import version_name
from service.gateway.book import BookError
from service.gateway.engine import PolicyUnavailable
from service.gateway.leader_forward import forward, published
from service.gateway.metrics import PROMOTIONS, sync_promoted
from service.gateway.protocol import PinRequest, VersionRequest
from service.gateway.state import GatewayState, state_of
from core.settings import GatewaySettings

log = logging.getLogger(__name__)

ADMIN_ERRORS = {401: {"description": "Missing or wrong bearer token"}, 404: {"description": "Admin off, or unknown"},
                409: {"description": "Not possible now"},
                503: {"description": "No leader replica reachable, or the change not shared yet (see Retry-After)"}}


def configured_token(settings: GatewaySettings) -> str | None:
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        return settings.admin_token.get_secret_value()
    if settings.admin_token_file is not None:
        try:
            token = settings.admin_token_file.read_text().strip()
        except OSError:
            log.error("admin token file %s is unreadable: admin routes are off", settings.admin_token_file)
            return None
        return token or None
    return None


def require_admin(request: Request) -> GatewayState:
    state = state_of(request)
    token = configured_token(state.settings)
    if token is None:
        raise HTTPException(404, "Not Found")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    if not ok:
        raise HTTPException(401, "a valid admin bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return state


Admin = Annotated[GatewayState, Depends(require_admin)]
router = APIRouter(prefix="/admin", tags=["admin"], responses=ADMIN_ERRORS)


@router.get("/versions")
async def versions(state: Admin):
    view = state.book.snapshot()
    try:
        listed = await state.router.listed()
    except httpx.HTTPError:
        listed = set()
    for v in view["versions"]:
        v["loaded"] = v["version"] in listed
    if state.control is not None:
        view["control"] = state.control.view()
    return view


@router.get("/leader")
async def leader(state: Admin):
    """Which replica leads (runs the promotion gate, makes admin changes) and what this one holds."""
    if state.control is None:
        return {"control_plane": False, "leading": True}
    return {"control_plane": True, **state.control.view()}


@router.get("/versions/{version}/answers")
async def answers(version: int, state: Admin):
    """The held-out prompts a version was scored on, its answers and each answer's signals (read them:
    a score that rises while the text gets worse is a bug)."""
    rows = state.book.answers(version)
    if rows is None:
        raise HTTPException(404, f"unknown version {version}")
    rec = state.book.record(version)
    return {"version": version, "name": version_name(version), "status": rec.status, "signals": rec.signals,
            "answers": rows}


@router.post("/promote")
async def promote(body: VersionRequest, request: Request, state: Admin):
    if (answer := await forward(state, request, body.model_dump())) is not None:
        return answer
    await _servable(state, body.version)
    previous = await _book(state.book.promote, body.version)
    return await _changed(state, "operator", f"promoted {version_name(body.version)} (was {version_name(previous)})")


@router.post("/pin")
async def pin(request: Request, state: Admin, body: PinRequest | None = None):
    if (answer := await forward(state, request, body.model_dump() if body else None)) is not None:
        return answer
    version = body.version if body and body.version is not None else state.book.promoted
    await _servable(state, version)
    before = state.book.promoted
    await _book(state.book.pin, version)
    trigger = "operator" if version != before else None
    return await _changed(state, trigger, f"pinned traffic to {version_name(version)}")


@router.post("/unpin")
async def unpin(request: Request, state: Admin):
    if (answer := await forward(state, request, None)) is not None:
        return answer
    await _book(state.book.unpin)
    return await _changed(state, None, "unpinned: the gate promotes again")


@router.post("/rollback")
async def rollback(request: Request, state: Admin):
    if (answer := await forward(state, request, None)) is not None:
        return answer
    history = state.book.snapshot()["history"]
    if len(history) >= 2:
        await _servable(state, history[-2])
    current, now = await _book(state.book.rollback)
    return await _changed(state, "rollback", f"rolled back from {version_name(current)} to {version_name(now)}")


async def _servable(state: GatewayState, version: int) -> None:
    if state.book.record(version) is None:
        raise HTTPException(404, f"unknown version {version}")
    try:
        await state.router.make_servable(version, everywhere=True)  # `policy` moves only where all serve it
    except PolicyUnavailable as exc:
        raise HTTPException(409, str(exc)) from None
    except httpx.HTTPError:
        raise HTTPException(503, "serving engine unreachable") from None


async def _book(method, *args):
    """A change of the book, in a worker thread: with the control plane it is published to Kafka before
    `on_change` returns."""
    def change():
        try:
            return method(*args)
        except BookError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    return await anyio.to_thread.run_sync(change)


async def _changed(state: GatewayState, trigger: str | None, what: str) -> dict:
    if trigger:
        PROMOTIONS.labels(trigger).inc()
    sync_promoted(state.book)
    log.warning("admin: %s", what)
    shared = await published(state)
    return {"done": what, **state.book.snapshot(), **({"control": shared} if shared else {})}
