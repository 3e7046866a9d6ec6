"""The request-body cap: 413 with a JSON body above `max_body_bytes`.

A pure ASGI middleware that counts the body's bytes as they stream in: a
declared Content-Length over the cap is refused before anything is read, and
a body that grows past it (chunked, or a Content-Length that lies) is cut off
there; whatever the route made of the cut body is dropped and the 413 sent
instead. Nothing above the cap is buffered.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

from service.gateway.metrics import TOO_LARGE
from service.gateway.protocol import error


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the cap (FastAPI lets an HTTPException through)."""


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self):
        TOO_LARGE.inc()
        return error(413, f"the request body is larger than {self.max_bytes} bytes, this gateway's limit",
                     code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    return await self._too_large()(scope, receive, send)
        received = 0
        over = False
        started = False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise BodyTooLarge(413, "request body too large")
            return message

        async def guarded_send(message):
            nonlocal started
            if over:  # the route's answer to a cut body: replaced by the 413 below
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._too_large()(scope, receive, send)
