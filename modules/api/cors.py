"""Which other web sites may use this server from a browser: read (CORS) and write (cross-site guard).

- **CORS**: Starlette's ``CORSMiddleware`` is always installed, for the UI and the API alike. No
  origin is ever reflected unless ``--cors-allow-origins``/``--cors-allow-origins-regex`` lists it.
  Its presence also switches Gradio's own CORS handling off (Gradio defers to a parent app's
  ``CORSMiddleware``); Gradio's would otherwise reflect *any* Origin, with credentials, to every
  request whose Host is not ``localhost`` (i.e. every request from the LAN).
  Credentials are allowed with an explicit list only: with ``*`` in the list, or a regex that
  matches any origin, they are off.
- **Cross-site guard**: a browser sends "simple" cross-site requests (a form POST, a ``fetch``
  with no JSON content type) without asking CORS first, with the user's cookies or cached Basic
  credentials. A state-changing request (any method but GET/HEAD/OPTIONS, and every websocket)
  whose ``Origin`` is neither this server nor an allowed CORS origin is refused with 403.
  Clients that are not browsers send no ``Origin`` and are not affected.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from modules.api.asgi_reply import send_text
from modules.api.hosts import split_host

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True)
class CorsPolicy:
    origins: tuple[str, ...] = ()
    regex: str | None = None

    @classmethod
    def from_opts(cls, opts: Any) -> "CorsPolicy":
        origins = tuple(o.strip().rstrip("/") for o in (getattr(opts, "cors_allow_origins", None) or "").split(",")
                        if o.strip())
        return cls(origins=origins, regex=getattr(opts, "cors_allow_origins_regex", None) or None)

    @property
    def allows_any(self) -> bool:
        """'*' listed, or a regex that matches a made-up origin (so, in effect, any)."""
        if "*" in self.origins:
            return True
        probe = f"https://{secrets.token_hex(8)}.invalid"
        return bool(self.regex and re.fullmatch(self.regex, probe))

    @property
    def credentials(self) -> bool:
        return bool(self.origins or self.regex) and not self.allows_any

    def allows(self, origin: str) -> bool:
        origin = origin.rstrip("/")
        return "*" in self.origins or origin in self.origins or bool(self.regex and re.fullmatch(self.regex, origin))


def _header(scope: dict, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return value.decode("latin-1")
    return None


def same_origin(origin: str, host_header: str | None) -> bool:
    """Whether a browser's Origin names this server as the request's Host header does."""
    host = split_host(host_header or "")
    if host is None:
        return False
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    name, port = host
    if parts.hostname.lower().rstrip(".") != name:
        return False
    # No port in Host (the default port, or a proxy in front that rewrites it): the name decides.
    return port is None or origin_port == port


class CrossSiteGuard:
    """Pure ASGI: refuses state-changing requests that a foreign web page made a browser send."""

    def __init__(self, app: Any, *, policy: CorsPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or (kind == "http" and scope.get("method") in SAFE_METHODS):
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if origin is None or self.policy.allows(origin) or same_origin(origin, _header(scope, b"host")):
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_text(send, 403, f"Cross-site request refused: Origin {origin[:100]!r} is not this server. To let "
                                   f"that site use this server, start it with --cors-allow-origins {origin[:100]}\n")


def install(app: Any, opts: Any) -> CorsPolicy:
    """Add the cross-site guard, then CORS outside it (after auth, before the Host check)."""
    from starlette.middleware.cors import CORSMiddleware  # the class Gradio looks for to defer to

    policy = CorsPolicy.from_opts(opts)
    app.add_middleware(CrossSiteGuard, policy=policy)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(policy.origins), allow_origin_regex=policy.regex,
        allow_methods=["*"], allow_headers=["*"], allow_credentials=policy.credentials,
    )
    return policy
