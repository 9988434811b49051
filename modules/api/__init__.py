"""A1111's HTTP API (/sdapi/v1) and the Basic auth that guards the app's non-UI routes.

webui.create_app calls :func:`setup_api` right after building the FastAPI app: before CORS
(so CORS stays the outermost middleware) and before the UI is mounted (a mount at "/" would
otherwise catch /sdapi/*), then tells it which routes are the Gradio UI's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from modules.api import auth


@dataclass
class ApiSetup:
    api: Any | None                     # routes.Api when --api, else None
    auth: auth.AuthPolicy | None        # None when no credentials are configured

    def exempt_ui(self, routes: Iterable[Any]) -> None:
        """These routes are the Gradio UI: its own login (--gradio-auth) applies, not Basic auth."""
        if self.auth is not None:
            for route in routes:
                self.auth.exempt(route)


def setup_api(app: Any, services: Any, *, gradio_credentials: Iterable[tuple[str, str]] = ()) -> ApiSetup:
    opts = services.cmd_opts
    policy = auth.install(app, opts, gradio_credentials)
    api = None
    if opts.api or opts.nowebui:
        from modules.api.routes import Api, install_error_handlers

        install_error_handlers(app)
        api = Api(app, services)
    return ApiSetup(api=api, auth=policy)
