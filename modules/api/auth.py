"""HTTP Basic auth for every route of the app except the Gradio UI's own.

The Gradio UI has its own login page (``--gradio-auth``); everything else on the FastAPI app
(/sdapi, /docs, /openapi.json and any route an extension registers later) is checked here.
Whether a request belongs to the UI is decided the way Starlette routes it: the first route
that fully matches the request handles it, so a request is left to Gradio only when that
route is the mount the UI was placed on. API and docs prefixes are always checked, even when
the UI is mounted at "/" and would otherwise catch them.

Credentials: ``--api-auth`` when given; otherwise the ``--gradio-auth``/``--gradio-auth-path``
ones, so a password-protected UI never leaves its API open. No flag: nothing is checked.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable

from starlette.routing import Match

from modules.core import flags as cmd_args

log = logging.getLogger(__name__)

ALWAYS_PROTECTED = ("/sdapi/", "/docs", "/openapi.json", "/redoc")
REALM_HEADER = (b"www-authenticate", b"Basic")


@dataclass
class AuthPolicy:
    credentials: list[tuple[str, str]]
    ui_routes: list[Any] = field(default_factory=list)  # route objects the Gradio UI is mounted as

    def exempt(self, route: Any) -> None:
        """Leave requests that this route handles to the UI's own login."""
        self.ui_routes.append(route)

    def check(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        if not sep:
            return False
        ok = False
        for want_user, want_password in self.credentials:
            # Evaluate both comparisons for every pair: no early exit that times the match.
            user_ok = secrets.compare_digest(user.encode(), want_user.encode())
            password_ok = secrets.compare_digest(password.encode(), want_password.encode())
            ok |= user_ok and password_ok
        return ok

    def is_protected(self, app: Any, scope: dict) -> bool:
        path = scope.get("path", "")
        if path.startswith(ALWAYS_PROTECTED) or path in ("/docs", "/openapi.json", "/redoc"):
            return True
        for route in getattr(app, "routes", ()):
            try:
                match, _ = route.matches(scope)
            except Exception:  # a route that cannot judge this scope does not handle it
                continue
            if match == Match.FULL:
                return not any(route is ui for ui in self.ui_routes)
        return True  # no route: 404/405 from the app itself, nothing of the UI's


class BasicAuthMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware), so Gradio's streamed responses pass untouched."""

    def __init__(self, app: Any, *, policy: AuthPolicy, router_app: Any):
        self.app = app
        self.policy = policy
        self.router_app = router_app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or not self.policy.is_protected(self.router_app, scope):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if self.policy.check(header):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        detail = "Incorrect username or password" if header else "Not authenticated"
        body = json.dumps({"error": "HTTPException", "detail": detail, "body": "",
                           "errors": f"401: {detail}"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), REALM_HEADER]})
        await send({"type": "http.response.body", "body": body})


def credentials_for(opts: Any, gradio_credentials: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    if getattr(opts, "api_auth", None):
        return cmd_args.parse_credentials(opts.api_auth, flag="--api-auth")
    return list(gradio_credentials)


def install(app: Any, opts: Any, gradio_credentials: Iterable[tuple[str, str]] = ()) -> AuthPolicy | None:
    """Add the middleware when any credentials are configured; returns the policy (or None).

    Call before other middleware (CORS) is added, so those stay outside it and a CORS
    preflight, which never carries credentials, is still answered.
    """
    creds = credentials_for(opts, gradio_credentials)
    if not creds:
        return None
    policy = AuthPolicy(credentials=creds)
    app.add_middleware(BasicAuthMiddleware, policy=policy, router_app=app)
    log.info("HTTP Basic auth required for the API and docs (%s)",
             "--api-auth" if getattr(opts, "api_auth", None) else "the --gradio-auth credentials")
    return policy
