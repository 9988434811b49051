"""One login for the whole app: HTTP Basic for the API, the UI's login session for the UI.

Every request passes one gate (a pure ASGI middleware). Which side it is on is decided the way
Starlette routes it: the first route that fully matches the request handles it, so a request
belongs to the UI only when that route is the mount the Gradio UI was placed on. API and docs
prefixes are always the API's, even when the UI is mounted at "/" and would otherwise catch them.

- **API side** (/sdapi, /docs, /openapi.json, routes extensions add, unknown paths): HTTP Basic.
- **UI side** (the Gradio mount): Gradio's login session (its ``access-token`` cookie). Without
  one, only what the login page itself needs is served (the page, its assets, ``POST /login``);
  every other Gradio route, including the ones Gradio leaves open (``/gradio_api/cancel``,
  ``/reset``, ``/heartbeat``, ``/stream``...), answers 401.

Credentials, one set for both sides unless both flags are given:

- ``--api-auth`` for the API; ``--gradio-auth``/``--gradio-auth-path`` for the UI;
- only one of them given: it is used for both (the UI's event API can do anything the API can);
- none: nothing is checked (allowed only on a loopback address, or with ``--insecure-no-auth``).

Wrong passwords, from Basic auth and from the UI's login form alike, are throttled per client
address (``modules.api.throttle``): after 5 failures further attempts get 429 with Retry-After.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable

from starlette.requests import cookie_parser
from starlette.routing import Match

from modules.api.throttle import LoginThrottle, client_address
from modules.core import flags as cmd_args

log = logging.getLogger(__name__)

ALWAYS_PROTECTED = ("/sdapi/", "/queue/", "/docs", "/openapi.json", "/redoc")
REALM_HEADER = (b"www-authenticate", b"Basic")

# What the Gradio login page loads before anyone has logged in (paths under the UI's mount).
# "/" renders the login form: no components until a login, and the endpoint list Gradio still
# embeds is stripped (BasicAuthMiddleware._login_page). The gate and the router judge the same
# path, so an allowed prefix always reaches Gradio's static-file routes, never another route.
LOGIN_PAGE_PATHS = frozenset({"/", "/theme.css", "/favicon.ico", "/manifest.json", "/robots.txt",
                              "/logout", "/gradio_api/login_check", "/gradio_api/theme.css"})
LOGIN_PAGE_PREFIXES = ("/assets/", "/static/", "/svelte/")
LOGIN_FORM_PATHS = ("/login", "/login/")
# Gradio's template escapes "<" inside the JSON, so the script's end is the first "</script>".
API_INFO_SCRIPT = re.compile(rb"<script>window\.gradio_api_info = [^<]*</script>")
EMPTY_API_INFO = b'<script>window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'


class UiSessions:
    """The Gradio app's login sessions, read from the cookies Gradio sets (duck-typed: no gradio import)."""

    def __init__(self, gradio_app: Any):
        self.gradio_app = gradio_app

    def valid(self, scope: dict) -> bool:
        cookie = _header(scope, b"cookie")
        if not cookie:
            return False
        cookies = cookie_parser(cookie)
        cookie_id = getattr(self.gradio_app, "cookie_id", None)
        tokens = getattr(self.gradio_app, "tokens", None) or {}
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            token = cookies.get(name)
            if token and token in tokens:
                return True
        return False


@dataclass
class AuthPolicy:
    credentials: list[tuple[str, str]]                      # the API's Basic credentials; [] = API open
    ui_routes: list[Any] = field(default_factory=list)      # route objects the Gradio UI is mounted as
    ui_sessions: UiSessions | None = None                   # None: the UI side is left to Gradio alone
    ui_prefix: str = ""                                     # the UI mount's path ("" at "/")
    throttle: LoginThrottle = field(default_factory=LoginThrottle)

    def exempt(self, route: Any) -> None:
        """Requests that this route handles are the UI's: its login session applies, not Basic auth."""
        self.ui_routes.append(route)

    def require_ui_login(self, sessions: UiSessions, prefix: str) -> None:
        self.ui_sessions = sessions
        self.ui_prefix = prefix.rstrip("/")

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

    def is_ui(self, app: Any, scope: dict) -> bool:
        path = scope.get("path", "")
        if path.startswith(ALWAYS_PROTECTED) or path in ("/docs", "/openapi.json", "/redoc"):
            return False
        for route in getattr(app, "routes", ()):
            try:
                match, _ = route.matches(scope)
            except Exception:  # a route that cannot judge this scope does not handle it
                continue
            if match == Match.FULL:
                return any(route is ui for ui in self.ui_routes)
        return False  # no route: 404/405 from the app itself, nothing of the UI's

    def is_protected(self, app: Any, scope: dict) -> bool:
        """Whether Basic auth applies (the API side)."""
        return not self.is_ui(app, scope)

    def ui_path(self, scope: dict) -> str:
        path = scope.get("path", "")
        if self.ui_prefix and path.startswith(self.ui_prefix):
            path = path[len(self.ui_prefix):]
        return path or "/"

    def is_login_page(self, scope: dict) -> bool:
        if scope.get("method", "GET") not in ("GET", "HEAD"):
            return False
        path = self.ui_path(scope)
        return path in LOGIN_PAGE_PATHS or path.startswith(LOGIN_PAGE_PREFIXES)


def _log_lockout(client: str, seconds: float) -> None:
    if seconds:
        log.warning("%s: too many wrong passwords; its login attempts are refused for %g s", client, seconds)


def _header(scope: dict, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return value.decode("latin-1")
    return None


async def _json_error(send: Any, status: int, error: str, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": error, "detail": detail, "body": "", "errors": f"{status}: {detail}"}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class BasicAuthMiddleware:
    """The gate. Pure ASGI (no BaseHTTPMiddleware), so Gradio's streamed responses pass untouched."""

    def __init__(self, app: Any, *, policy: AuthPolicy, router_app: Any):
        self.app = app
        self.policy = policy
        self.router_app = router_app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.policy.is_ui(self.router_app, scope):
            await self._ui(scope, receive, send)
        else:
            await self._api(scope, receive, send)

    async def _refuse(self, scope: dict, send: Any, status: int, detail: str, headers=()) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        error = "TooManyRequests" if status == 429 else "HTTPException"
        await _json_error(send, status, error, detail, headers)

    async def _too_many(self, scope: dict, send: Any, client: str) -> None:
        wait = self.policy.throttle.retry_after_header(client)
        await self._refuse(scope, send, 429, f"Too many failed logins from your address; try again in {wait} s",
                           [(b"retry-after", wait.encode())])

    async def _api(self, scope: dict, receive: Any, send: Any) -> None:
        policy = self.policy
        if not policy.credentials:
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        if not header:
            await self._refuse(scope, send, 401, "Not authenticated", [REALM_HEADER])
            return
        client = client_address(scope)
        if policy.throttle.retry_after(client) > 0:
            await self._too_many(scope, send, client)
            return
        if policy.check(header):
            policy.throttle.success(client)
            await self.app(scope, receive, send)
            return
        _log_lockout(client, policy.throttle.failure(client))
        await self._refuse(scope, send, 401, "Incorrect username or password", [REALM_HEADER])

    async def _ui(self, scope: dict, receive: Any, send: Any) -> None:
        policy = self.policy
        sessions = policy.ui_sessions
        if sessions is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("method") == "POST" and policy.ui_path(scope) in LOGIN_FORM_PATHS:
            await self._login_form(scope, receive, send)
            return
        if sessions.valid(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and policy.is_login_page(scope):
            if policy.ui_path(scope) == "/":
                await self._login_page(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        await self._refuse(scope, send, 401, "Not authenticated: log in on the UI's page first")

    async def _login_page(self, scope: dict, receive: Any, send: Any) -> None:
        """Gradio's page before a login: the login form, minus the description of every UI endpoint
        (with current choices and settings values) that Gradio embeds in it for anyone."""
        scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", ()) if k != b"accept-encoding"]}
        start: dict = {}
        chunks: list[bytes] = []

        async def collect(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = API_INFO_SCRIPT.sub(EMPTY_API_INFO, b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", ()) if k != b"content-length"]
            if scope.get("method") != "HEAD":
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body if scope.get("method") != "HEAD" else b""})

        await self.app(scope, receive, collect)

    async def _login_form(self, scope: dict, receive: Any, send: Any) -> None:
        """Gradio's POST /login, throttled: 200 is a good password, anything else a wrong one."""
        throttle = self.policy.throttle
        client = client_address(scope)
        if throttle.retry_after(client) > 0:
            await self._too_many(scope, send, client)
            return
        # Counted as a failure before it is checked (a burst of parallel guesses cannot slip in
        # between check and count); a 200 from Gradio clears the record again.
        lockout = throttle.failure(client)

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 200:
                    throttle.success(client)
                else:
                    _log_lockout(client, lockout)
            await send(message)

        await self.app(scope, receive, watch)


def credentials_for(opts: Any, gradio_credentials: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The API's Basic credentials: --api-auth, else the UI's."""
    if getattr(opts, "api_auth", None):
        return cmd_args.parse_credentials(opts.api_auth, flag="--api-auth")
    return list(gradio_credentials)


def ui_credentials_for(opts: Any, gradio_credentials: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The UI's login: --gradio-auth/--gradio-auth-path, else --api-auth's (never an open UI beside a locked API)."""
    gradio_credentials = list(gradio_credentials)
    if gradio_credentials:
        return gradio_credentials
    if getattr(opts, "api_auth", None):
        return cmd_args.parse_credentials(opts.api_auth, flag="--api-auth")
    return []


def install(app: Any, opts: Any, gradio_credentials: Iterable[tuple[str, str]] = (),
            throttle: LoginThrottle | None = None) -> AuthPolicy | None:
    """Add the gate when any credentials are configured; returns the policy (or None).

    Call before other middleware (CORS, the Host check) is added, so those stay outside it and a
    CORS preflight, which never carries credentials, is still answered.
    """
    creds = credentials_for(opts, gradio_credentials)
    if not creds:
        return None
    policy = AuthPolicy(credentials=creds, throttle=throttle or LoginThrottle())
    app.add_middleware(BasicAuthMiddleware, policy=policy, router_app=app)
    log.info("HTTP Basic auth required for the API and docs (%s)",
             "--api-auth" if getattr(opts, "api_auth", None) else "the --gradio-auth credentials")
    return policy
