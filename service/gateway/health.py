"""/healthz (the process answers), /readyz (able to serve: the engine answers, the gate's decisions were read
once, and the policy is servable), /metrics.

Ready means able to serve completions, which needs no Kafka once the gate's
decisions were read (a replica that starts while the broker is away is not
ready: it would not know which version is `policy`). A broker outage is
reported in /readyz's body (`broker`), in `odpo_gateway_broker_up` and by the
OdpoGatewayBrokerDown alert, but does not take the gateway out of its
Service. Meanwhile mirrored prompts are dropped and counted
(`odpo_gateway_mirror_dropped_total`) and feedback answers 503 (the client
keeps it and retries; nothing is taken and then lost).
"""

from __future__ import annotations

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.contracts import version_name
from service.gateway.engine import PolicyUnavailable
from service.gateway.protocol import error
from service.gateway.state import state_of

router = APIRouter()


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: what is missing (JSON error body)"}})
async def readyz(request: Request):
    state = state_of(request)
    problems = []
    promoted = state.book.promoted
    try:
        await state.router.listed()
    except httpx.HTTPError as exc:
        problems.append(f"serving engine unreachable: {exc.__class__.__name__}")
    else:
        try:
            await state.router.make_servable(promoted)
        except (PolicyUnavailable, httpx.HTTPError) as exc:
            problems.append(f"{version_name(promoted)} is not servable: {exc}")
    if not state.registry.has_read:  # until then `policy` would be `base`, whatever the gate promoted
        problems.append(f"the gate's decisions not read yet from {state.registry.topic}")
    broker = "ok" if await state.broker.ok() else "unreachable"
    if problems:
        return error(503, "; ".join(problems + [f"broker {state.broker.bootstrap} {broker}"]), "unavailable")
    return {"status": "ready", "policy_version": promoted, "pinned": state.book.pinned, "broker": broker,
            "registry": state.registry.view()}


@router.get("/metrics", responses={404: {"description": "Served on `metrics_port` instead"}})
async def metrics(request: Request):
    if state_of(request).settings.metrics_port is not None:
        return error(404, "/metrics is served on the gateway's metrics port", code="not_found")
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
