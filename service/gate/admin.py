"""The admin API, on the gate only: list versions with their scores, read their held-out answers, promote, pin,
unpin, roll back.

Every route needs `Authorization: Bearer <token>`; the token comes from
`ODPO_GATE_ADMIN_TOKEN` or the file `ODPO_GATE_ADMIN_TOKEN_FILE` (a
Kubernetes Secret mount, read on each request so a rotated secret applies
without a restart) and is compared in constant time. With no token
configured the admin routes answer 404, as if they did not exist.

A change answers once it is on the control topic (with the `seq` of the
state that holds it: every gateway replica serves it once its `/readyz` shows
that seq, within about 0.1 s); while the broker is unreachable the change is
made and kept (registry file) but the answer is 503 with `Retry-After`, and
the gate publishes it once the broker is back. A gate that a newer one fenced
refuses changes (409).
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

import anyio
import httpx
from fastapi import APIRouter, Depends, HTTPException, Request

from core.contracts import version_name
from core.settings import GateSettings
from service.gate.control import NotReplicated
from service.gate.metrics import PROMOTIONS, sync_promoted
from service.gate.state import GateState, state_of
from service.gateway.engine import PolicyUnavailable
from service.gateway.protocol import RETRY_AFTER_S, PinRequest, VersionRequest
from service.registry.book import BookError

log = logging.getLogger(__name__)

ADMIN_ERRORS = {401: {"description": "Missing or wrong bearer token"}, 404: {"description": "Admin off, or unknown"},
                409: {"description": "Not possible now"},
                503: {"description": "The change is made but not on the control topic yet (see Retry-After)"}}


def configured_token(settings: GateSettings) -> str | None:
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


def require_admin(request: Request) -> GateState:
    state = state_of(request)
    token = configured_token(state.settings)
    if token is None:
        raise HTTPException(404, "Not Found")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    if not ok:
        raise HTTPException(401, "a valid admin bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return state


Admin = Annotated[GateState, Depends(require_admin)]
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
    view["control"] = state.control.view()
    return view


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
async def promote(body: VersionRequest, state: Admin):
    _writing(state)
    await _servable(state, body.version)
    previous = await _book(state.book.promote, body.version)
    return await _changed(state, "operator", f"promoted {version_name(body.version)} (was {version_name(previous)})")


@router.post("/pin")
async def pin(state: Admin, body: PinRequest | None = None):
    _writing(state)
    version = body.version if body and body.version is not None else state.book.promoted
    await _servable(state, version)
    before = state.book.promoted
    await _book(state.book.pin, version)
    trigger = "operator" if version != before else None
    return await _changed(state, trigger, f"pinned traffic to {version_name(version)}")


@router.post("/unpin")
async def unpin(state: Admin):
    _writing(state)
    await _book(state.book.unpin)
    return await _changed(state, None, "unpinned: the gate promotes again")


@router.post("/rollback")
async def rollback(state: Admin):
    _writing(state)
    history = state.book.snapshot()["history"]
    if len(history) >= 2:
        await _servable(state, history[-2])
    current, now = await _book(state.book.rollback)
    return await _changed(state, "rollback", f"rolled back from {version_name(current)} to {version_name(now)}")


async def _servable(state: GateState, version: int) -> None:
    if state.book.record(version) is None:
        raise HTTPException(404, f"unknown version {version}")
    try:
        await state.router.make_servable(version, everywhere=True)  # `policy` moves only where all serve it
    except PolicyUnavailable as exc:
        raise HTTPException(409, str(exc)) from None
    except httpx.HTTPError:
        raise HTTPException(503, "serving engine unreachable") from None


def _writing(state: GateState) -> None:
    """Changes are made only while this gate writes the registry: 503 while it starts (it reads the control topic
    first), 409 once a newer gate fenced it."""
    role = state.control.role
    if role == "fenced":
        raise HTTPException(409, "a newer gate writes the registry: this one decides nothing (stop it)")
    if not state.control.term:
        raise HTTPException(503, f"the gate is starting ({role}): it reads the control topic first",
                            headers={"Retry-After": str(RETRY_AFTER_S)})


async def _book(method, *args):
    """A change of the book, in a worker thread: it is published to the control topic before `on_change`
    returns (or marked to be published once the broker answers)."""
    def change():
        try:
            return method(*args)
        except BookError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    return await anyio.to_thread.run_sync(change)


async def _changed(state: GateState, trigger: str | None, what: str) -> dict:
    if trigger:
        PROMOTIONS.labels(trigger).inc()
    sync_promoted(state.book)
    log.warning("admin: %s", what)
    try:
        seq = await anyio.to_thread.run_sync(state.control.published_seq)
    except NotReplicated as exc:
        raise HTTPException(503, f"{what}; kept by the gate but not on the control topic yet ({exc}): the "
                                 "gateways serve it once the broker answers",
                            headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    return {"done": what, **state.book.snapshot(), "control": {**state.control.view(), "seq": seq}}
