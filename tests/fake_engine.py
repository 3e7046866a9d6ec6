"""A stand-in for vLLM's OpenAI server, for gateway tests that need answers but not a model: it lists the
names it is given, answers chat completions with a fixed text, and counts the requests it gets."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.broker import free_port
from tests.gateway_server import _serving


class FakeEngine:
    def __init__(self, names: list[str]):
        self.names = list(names)
        self.calls: collections.Counter[str] = collections.Counter()
        self._ids = itertools.count(1)

    async def models(self, request: Request):
        self.calls["models"] += 1
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model"} for n in self.names]})

    async def chat(self, request: Request):
        self.calls["chat"] += 1
        body = await request.json()
        n = body.get("n") or 1
        return JSONResponse({
            "id": f"chatcmpl-fake-{next(self._ids)}", "object": "chat.completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": i, "message": {"role": "assistant", "content": f"answer {i}"},
                         "finish_reason": "stop"} for i in range(n)],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/models", self.models), Route("/v1/chat/completions", self.chat,
                                                                           methods=["POST"])])


@contextmanager
def running_fake_engine(names: list[str] = ("base",)) -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(list(names))
    port = free_port()
    with _serving(engine.app(), port) as url:
        yield url, engine
