"""A pure ASGI middleware that refuses request bodies over a size limit with 413.

A declared ``Content-Length`` over the limit is answered at once, before the app runs or a byte
of the body is read; a body sent without one (chunked) is counted as it arrives and refused as
soon as it passes the limit. Routes whose path ends in ``/upload`` (Gradio's file uploads) get
the upload limit instead, plus room for the multipart framing.
"""
from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException

from modules.api.asgi_reply import send_response

__all__ = ["BodySizeLimit"]

_MULTIPART_SLACK = 1024 * 1024


class _TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body: larger than {limit} bytes (--max-body-mb)")


class BodySizeLimit:
    def __init__(self, app: Any, max_bytes: int, upload_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.upload_bytes = int(upload_bytes if upload_bytes is not None else max_bytes)

    def _limit_for(self, path: str) -> int:
        if path.rstrip("/").endswith("/upload"):
            return max(self.max_bytes, self.upload_bytes + _MULTIPART_SLACK)
        return self.max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope.get("path", ""))
        declared = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _refuse(send, 400, "request: invalid Content-Length header")
                    return
        if declared is not None and declared > limit:
            await _refuse(send, 413, f"request body: {declared} bytes; at most {limit} (--max-body-mb)")
            return

        received = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(limit)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await _refuse(send, 413, f"request body: larger than {limit} bytes (--max-body-mb)")


async def _refuse(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"error": "HTTPException", "detail": detail, "body": "", "errors": detail}).encode()
    await send_response(send, status, body, b"application/json", ((b"connection", b"close"),))
