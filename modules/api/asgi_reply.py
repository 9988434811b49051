"""Answering from a pure ASGI middleware, before any app runs (Host check, cross-site guard, body limit)."""
from __future__ import annotations

from typing import Any


async def send_response(send: Any, status: int, body: bytes, content_type: bytes,
                        extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    headers = [(b"content-type", content_type), (b"x-content-type-options", b"nosniff"),
               (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_text(send: Any, status: int, text: str) -> None:
    """A plain-text refusal: the reason and what flag would allow the request."""
    await send_response(send, status, text.encode("utf-8", "replace"), b"text/plain; charset=utf-8")
