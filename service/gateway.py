"""The OpenAI-compatible front door: resolves model aliases and forwards to the serving engine.

Model names: `policy` (the newest loaded version), `policy-v<N>`, `base`.
Errors are OpenAI-shaped JSON bodies (`{"error": {"message", "type", "code"}}`).
This module stays light: no torch, no Kafka.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.contracts import BASE_MODEL_NAME, POLICY_ALIAS, parse_version_name, version_name
from service.policy_registry import PolicyRegistry, UnknownModel
from service.settings import GatewaySettings

REQUESTS = Counter("odpo_gateway_requests_total", "Requests by route, model alias and status.",
                   ["route", "alias", "status"])
LATENCY = Histogram("odpo_gateway_request_seconds", "Request latency by route (to the last byte for streams).",
                    ["route"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
POLICY_VERSION = Gauge("odpo_gateway_policy_version", "Version the alias `policy` resolves to.")


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code or str(status)}}, status_code=status)


def _alias(model: Any) -> str:
    """A bounded label value for a requested model name."""
    if model in (POLICY_ALIAS, BASE_MODEL_NAME):
        return model
    return "version" if isinstance(model, str) and parse_version_name(model) is not None else "other"


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(base_url=settings.vllm_url, timeout=settings.request_timeout_s) as client:
            app.state.client = client
            app.state.registry = PolicyRegistry(client, settings.models_refresh_s)
            yield

    app = FastAPI(title="odpo gateway", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5]))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        try:
            version = await request.app.state.registry.promoted()
        except httpx.HTTPError as exc:
            return _error(503, f"serving engine unreachable: {exc.__class__.__name__}", "unavailable")
        if version is None:
            return _error(503, "no policy version is loaded yet", "unavailable")
        POLICY_VERSION.set(version)
        return {"status": "ready", "policy_version": version}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            loaded = await request.app.state.registry.versions()
        except httpx.HTTPError:
            return _error(503, "serving engine unreachable", "unavailable")
        names = ([POLICY_ALIAS] if loaded else []) + [version_name(v) for v in loaded]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "odpo"} for n in names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _forward(request, "/v1/chat/completions", required=("messages",))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _forward(request, "/v1/completions", required=("prompt",))

    return app


async def _forward(request: Request, route: str, required: tuple[str, ...]) -> Response:
    started = time.perf_counter()
    body, problem = await _read_body(request, required)
    alias = _alias(body.get("model")) if body else "other"
    if problem:
        REQUESTS.labels(route, alias, "400").inc()
        return _error(400, problem)
    registry: PolicyRegistry = request.app.state.registry
    try:
        served = await registry.resolve(body["model"])
    except UnknownModel as exc:
        REQUESTS.labels(route, alias, "404").inc()
        return _error(404, str(exc), code="model_not_found")
    except httpx.HTTPError:
        REQUESTS.labels(route, alias, "503").inc()
        return _error(503, "serving engine unreachable", "unavailable")
    body["model"] = served
    client: httpx.AsyncClient = request.app.state.client
    version = str(parse_version_name(served))
    if body.get("stream"):
        return await _stream(client, route, body, alias, version, started)
    try:
        resp = await client.post(route, json=body)
    except httpx.HTTPError as exc:
        REQUESTS.labels(route, alias, "502").inc()
        return _error(502, f"serving engine failed: {exc.__class__.__name__}", "upstream_error")
    REQUESTS.labels(route, alias, str(resp.status_code)).inc()
    LATENCY.labels(route).observe(time.perf_counter() - started)
    return Response(resp.content, status_code=resp.status_code, media_type="application/json",
                    headers={"x-odpo-policy-version": version})


async def _stream(client: httpx.AsyncClient, route: str, body: dict, alias: str, version: str,
                  started: float) -> Response:
    upstream = await client.send(client.build_request("POST", route, json=body), stream=True)
    if upstream.status_code != 200:
        content = await upstream.aread()
        await upstream.aclose()
        REQUESTS.labels(route, alias, str(upstream.status_code)).inc()
        return Response(content, status_code=upstream.status_code, media_type="application/json")

    async def relay():
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()
            REQUESTS.labels(route, alias, "200").inc()
            LATENCY.labels(route).observe(time.perf_counter() - started)

    return StreamingResponse(relay(), media_type="text/event-stream", headers={"x-odpo-policy-version": version})


async def _read_body(request: Request, required: tuple[str, ...]) -> tuple[dict, str | None]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}, "the request body is not valid JSON"
    if not isinstance(body, dict):
        return {}, "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return body, "`model` is required: `policy`, `base` or `policy-v<N>`"
    missing = [k for k in required if k not in body]
    if missing:
        return body, f"missing field(s): {', '.join(missing)}"
    return body, None
