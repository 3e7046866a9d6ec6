"""/v1/feedback (a rating of a served response, or a choice between two) and /v1/prompts (enqueue prompts).

Feedback names responses by id only; the gateway fills in the prompt and the
texts it served (`Feedback.prompt/response/other_response`), so the judge's
`human` plugin can build pairs without trusting client-sent text. Both routes
answer 202 once Kafka has the message. A response another replica served (or
this one before a restart) is known from odpo.served (served_log.py); an id
not known here is looked for again once that topic is read to its end, at
most `CATCH_UP_S` later.

With client keys (keys.py) each key may name a response in at most
`feedback_per_response` feedback messages (409 after that) and send at most
`feedback_per_hour` (429 with `Retry-After`). A prompt's `task` is what the
verifier judge rewards, so a client may only give tasks of the kinds in
`prompt_task_kinds` (the bundled constraints by default; 400 otherwise).
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from core.contracts import TOPIC_FEEDBACK, TOPIC_PROMPTS, Feedback
from core.topics import topic_name
from service.gateway.keys import ApiKey, retry_after
from service.gateway.metrics import ENQUEUED, FEEDBACK, KEY_REFUSALS
from service.gateway.outbox import BrokerUnavailable
from service.gateway.protocol import ERROR_RESPONSES, FeedbackRequest, PromptsRequest, error
from service.gateway.served import ServedChoice, new_prompt_id
from service.gateway.state import GatewayState, state_of

router = APIRouter()

CATCH_UP_S = 2.0  # the longest /v1/feedback waits for odpo.served before an id is unknown (404)


@router.post("/v1/feedback", status_code=202, responses=ERROR_RESPONSES)
async def feedback(body: FeedbackRequest, request: Request):
    state = state_of(request)
    ids = [body.response_id] + ([body.other_response_id] if body.other_response_id is not None else [])
    found = await _served(state, ids)
    for response_id, kept in zip(ids, found):
        if kept is None:
            return error(404, f"unknown response id `{response_id}` (or no longer kept)", code="response_not_found")
    this, other = found[0], (found[1] if len(found) > 1 else None)
    if this.prompt is None:
        return error(400, "that response's request cannot become a prompt (it must end with a non-empty user turn)")
    if other is not None:
        if other.prompt is None or _content(other.prompt) != _content(this.prompt):
            return error(400, "the two responses answer different prompts")
        if other.text == this.text:
            return error(400, "the two responses are identical")
    message = Feedback(
        response_id=body.response_id, rating=body.rating, other_response_id=body.other_response_id,
        preferred=body.preferred, prompt=this.prompt, response=this.response(body.response_id),
        other_response=other.response(body.other_response_id) if other else None)
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if key is not None:
        capped = state.feedback_caps.reserve(key, ids)
        if capped is not None:
            status, why, wait = capped
            KEY_REFUSALS.labels(key.id, "feedback_per_response" if status == 409 else "feedback_per_hour").inc()
            return error(status, why, "conflict_error" if status == 409 else "rate_limit_error",
                         code="feedback_exists" if status == 409 else "feedback_rate_exceeded",
                         headers=retry_after(wait) if status == 429 else None)
    try:
        await anyio.to_thread.run_sync(state.outbox.publish, topic_name(TOPIC_FEEDBACK), [(this.prompt.id, message)])
    except BrokerUnavailable as exc:
        if key is not None:
            state.feedback_caps.release(key, ids)
        return error(503, str(exc), "unavailable")
    FEEDBACK.labels("choice" if other else "rating").inc()
    return JSONResponse({"status": "accepted", "response_id": body.response_id, "prompt_id": this.prompt.id},
                        status_code=202)


@router.post("/v1/prompts", status_code=202, responses=ERROR_RESPONSES)
async def enqueue_prompts(body: PromptsRequest, request: Request):
    state = state_of(request)
    allowed = state.settings.prompt_task_kinds
    for i, p in enumerate(body.prompts):
        if p.task and p.task.get("kind") not in allowed:
            return error(400, f"prompts.{i}.task: kind {p.task.get('kind')!r} is not accepted from clients "
                              f"(accepted: {', '.join(map(repr, allowed)) or 'none'}; ODPO_GATEWAY_PROMPT_TASK_KINDS)",
                         code="task_kind_not_allowed")
    events = [p.to_event(new_prompt_id()) for p in body.prompts]
    try:
        await anyio.to_thread.run_sync(state.outbox.publish, topic_name(TOPIC_PROMPTS), [(e.id, e) for e in events])
    except BrokerUnavailable as exc:
        return error(503, str(exc), "unavailable")
    ENQUEUED.inc(len(events))
    return JSONResponse({"status": "accepted", "ids": [e.id for e in events]}, status_code=202)


async def _served(state: GatewayState, ids: list[str]) -> list[ServedChoice | None]:
    """The responses `ids` name; if one is not kept here, looked up again once odpo.served is read to its end."""
    found = [state.served.get(i) for i in ids]
    if None in found and state.served_log is not None:
        await state.served_log.caught_up(CATCH_UP_S)
        found = [state.served.get(i) for i in ids]
    return found


def _content(prompt) -> tuple:
    return (tuple((m.role, m.content) for m in prompt.messages) if prompt.messages else None, prompt.text)
