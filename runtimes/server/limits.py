"""Request bodies past a size limit get 413 before anything parses them.

An ASGI middleware: it refuses a declared Content-Length over the limit at once, and counts the
bytes of a body that does not declare one (chunked), refusing it as soon as it passes the limit.
"""
from __future__ import annotations

import json

from starlette.exceptions import HTTPException


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _reply(send, 400, "the Content-Length header is not a number")
            if int(declared) > self.max_bytes:
                return await _reply(send, 413, self._message())
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # the app's handler answers it (413, OpenAI's error object)
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return (f"the request body is larger than the server's limit of {self.max_bytes} bytes "
                "(--max-body-bytes)")


async def _reply(send, status: int, message: str) -> None:
    kind = "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": "request_too_large" if status == 413 else None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
