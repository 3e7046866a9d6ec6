"""Request bodies of the gateway's HTTP API, as strict pydantic models (so the OpenAPI spec describes them).

Unknown fields are refused (like OpenAI's own API answers "Unrecognized
request argument"), bounds are declared, and every error is an OpenAI-shaped
JSON body: `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.bus import validation_message
from core.contracts import ChatMessage, PromptEvent

MODEL_HELP = "`policy` (the promoted version), `base` or `policy-v<N>`."
NO_LEARN_HEADER = "x-odpo-no-learn"
MAX_PROMPT_BYTES = 256 * 1024  # one odpo.prompts message; Kafka's default limit is 1 MiB
# list lengths (the whole body is capped too: ODPO_GATEWAY_MAX_BODY_BYTES, body_limit.py)
MAX_MESSAGES = 256  # turns of a chat request or a prompt
MAX_PARTS = 64  # text parts of one message's content
MAX_COMPLETION_PROMPTS = 16  # prompts of one /v1/completions request
MAX_PROMPTS = 64  # prompts of one /v1/prompts call
MAX_N = 8  # choices per prompt
MAX_STOP = 4  # stop strings

Text = Annotated[str, Field(max_length=100_000)]
ResponseId = Annotated[str, Field(min_length=1, max_length=200)]


RETRY_AFTER_S = 2


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 503:  # unavailable for now (an engine or the broker restarting): say when to try again
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return JSONResponse({"error": {"message": message, "type": kind, "code": code or str(status)}},
                        status_code=status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (JSON error body)"},
    401: {"description": "No valid API key, when keys are on (JSON error body)"},
    403: {"description": "The API key lacks the route's scope (JSON error body)"},
    404: {"description": "Unknown model or id (JSON error body)"},
    409: {"description": "Feedback this API key already gave on that response (JSON error body)"},
    413: {"description": "Request body over the gateway's limit (JSON error body)"},
    429: {"description": "The API key's rate, quota or feedback limit reached; see Retry-After (JSON error body)"},
    503: {"description": "Serving engine or broker unavailable (JSON error body)"},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_PARTS)] = Field(
        description="A string, or a list of text parts.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class SamplingRequest(_Strict):
    model: str = Field(min_length=1, max_length=200, description=MODEL_HELP)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20, description="Most new tokens per choice.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N, description="Choices per prompt.")
    stream: bool | None = Field(default=None, description="Server-sent events, OpenAI-style.")
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(max_length=200)] | Annotated[list[Annotated[str, Field(max_length=200)]],
                                                            Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 63) - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = Field(default=None, max_length=256)

    def choices_per_prompt(self) -> int:
        return self.n or 1


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str, Field(min_length=1, max_length=100_000)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=100_000)]], Field(min_length=1, max_length=MAX_COMPLETION_PROMPTS)]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class FeedbackRequest(_Strict):
    """A rating of one served response, or a choice between two served responses to the same prompt.

    Response ids are the `id` of a completion; `<id>:<index>` names choice
    `index` of a response that had several (`<id>` alone is choice 0).
    """

    response_id: ResponseId
    rating: float | None = Field(default=None, ge=-1, le=1, description="-1 (bad) .. 1 (good).")
    other_response_id: ResponseId | None = Field(default=None, description="For a choice between two responses.")
    preferred: Literal["this", "other"] | None = Field(default=None, description="Which of the two is better.")

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackRequest:
        is_choice = self.other_response_id is not None
        if is_choice == (self.rating is not None):
            raise ValueError("give either `rating` or `other_response_id` + `preferred`")
        if is_choice and self.preferred is None:
            raise ValueError("`preferred` is required with `other_response_id`")
        if not is_choice and self.preferred is not None:
            raise ValueError("`preferred` needs `other_response_id`")
        if is_choice and self.other_response_id == self.response_id:
            raise ValueError("a choice needs two different responses")
        return self


class PromptIn(_Strict):
    """One prompt for online sampling: chat `messages` (ending with a user turn) or `text`."""

    id: str | None = Field(default=None, min_length=1, max_length=200, description="Default: a new id.")
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)
    text: Text | None = None
    task: dict[str, Any] = Field(default_factory=dict, description="Metadata a verifier judge needs.")

    @model_validator(mode="after")
    def _valid_event(self) -> PromptIn:
        try:  # PromptEvent's own rules: one form, non-empty, the last turn a user turn
            event = self.to_event("check")
        except ValidationError as exc:
            raise ValueError(validation_message(exc)) from None
        if len(event.to_bytes()) > MAX_PROMPT_BYTES:
            raise ValueError(f"a prompt may take at most {MAX_PROMPT_BYTES} bytes as JSON")
        return self

    def to_event(self, default_id: str, source: str = "api") -> PromptEvent:
        return PromptEvent(id=self.id or default_id, messages=self.messages, text=self.text, task=self.task,
                           source=source)


class PromptsRequest(_Strict):
    prompts: list[PromptIn] = Field(min_length=1, max_length=MAX_PROMPTS)


class VersionRequest(_Strict):
    version: int = Field(ge=0, le=1 << 31, description="0 is `base`.")


class PinRequest(_Strict):
    version: int | None = Field(default=None, ge=0, le=1 << 31, description="Default: the promoted version.")


ERROR_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "unavailable"}


def json_errors(app) -> None:
    """Every error of `app` as an OpenAI-shaped JSON body, never a traceback (the gateway and the gate)."""
    import logging

    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    log = logging.getLogger(app.title)

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


def _describe(err: dict) -> str:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    return f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
