"""A1111's HTTP API (/sdapi/v1) and the trust boundary every request crosses first.

webui.create_app calls :func:`setup_api` right after building the FastAPI app, before the UI is
mounted (a mount at "/" would otherwise catch /sdapi/*), then tells it which routes are the
Gradio UI's (:meth:`ApiSetup.attach_ui`). The middleware, outermost first:

1. ``hosts``: the Host check (DNS rebinding): 400 for a Host that is not this server's;
2. ``cors``: CORS (no origin reflected unless listed) and the cross-site guard (403 for a
   state-changing request from a foreign web page);
3. ``auth``: HTTP Basic for the API, the UI's login session for the UI, login throttling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from modules.api import auth, cors, hosts


@dataclass
class ApiSetup:
    api: Any | None                     # routes.Api when --api, else None
    auth: auth.AuthPolicy | None        # None when no credentials are configured
    hosts: hosts.HostPolicy | None = None
    cors: cors.CorsPolicy | None = None

    def exempt_ui(self, routes: Iterable[Any]) -> None:
        """These routes are the Gradio UI: its own login applies, not Basic auth."""
        if self.auth is not None:
            for route in routes:
                self.auth.exempt(route)

    def attach_ui(self, routes: Iterable[Any], *, mount: Any) -> None:
        """The UI's routes, and the mount whose Gradio app holds the login sessions: without a
        session, only the login page is served there."""
        routes = list(routes)
        self.exempt_ui(routes)
        if self.auth is not None:
            self.auth.require_ui_login(auth.UiSessions(mount.app), getattr(mount, "path", ""))


def setup_api(app: Any, services: Any, *, gradio_credentials: Iterable[tuple[str, str]] = ()) -> ApiSetup:
    opts = services.cmd_opts
    policy = auth.install(app, opts, gradio_credentials)   # innermost of the three
    cors_policy = cors.install(app, opts)
    host_policy = hosts.install(app, opts)                 # outermost
    api = None
    if opts.api or opts.nowebui:
        from modules.api.routes import Api, install_error_handlers

        install_error_handlers(app)
        api = Api(app, services)
        if getattr(services, "queue", None) is not None:
            from modules.api.queue_routes import QueueApi

            QueueApi(app, services, api)   # /queue/v1: submit without waiting, the history
    return ApiSetup(api=api, auth=policy, hosts=host_policy, cors=cors_policy)
