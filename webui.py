"""The composition root: flags -> settings -> services -> UI + API -> serve.

Nothing heavy (torch, diffusers) is imported on the way to the first HTTP
response; models load lazily when a job first needs one.
"""
from __future__ import annotations

import os

# Set before gradio/huggingface modules are imported anywhere: Gradio phones
# home at launch otherwise, and model code must never reach for the hub.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")

import logging
import socket
import sys
import threading
import time
from pathlib import Path

from modules.core import flags as cmd_args
from modules.core.flags import FlagError
from modules.core.options import Options, default_templates
from modules.core.paths import AppPaths
from modules.core.saving import remove_leftover_temp_files
from modules.services import Services, build_services

log = logging.getLogger("webui")


class StartupError(Exception):
    """A problem that stops startup; the message is printed alone, no traceback."""


def read_gradio_credentials(opts) -> list[tuple[str, str]]:
    creds: list[tuple[str, str]] = []
    if opts.gradio_auth:
        creds += cmd_args.parse_credentials(opts.gradio_auth, flag="--gradio-auth")
    if opts.gradio_auth_path:
        try:
            text = Path(opts.gradio_auth_path).expanduser().read_text(encoding="utf-8")
        except OSError as err:
            raise StartupError(f"--gradio-auth-path: cannot read {opts.gradio_auth_path}: {err.strerror}") from None
        creds += cmd_args.parse_credentials(text, flag="--gradio-auth-path")
    return creds


def open_listening_socket(host: str, port: int) -> socket.socket:
    """Bind before the slow imports, so a busy port is reported at once and
    nothing can take it between the check and the serve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise StartupError(f"cannot resolve --server-name {host!r}: {err.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # on Windows SO_REUSEADDR lets two servers share a port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise StartupError(
                f"port {port} on {host} is already in use (another WebUI may be running). "
                f"Stop it, or choose another port with --port."
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def prepare(parsed: cmd_args.ParsedArgs) -> tuple[Services, list[str]]:
    opts = parsed.opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    options = Options(paths.config_file, default_templates(), frozen=False)
    warnings = options.load()
    object.__setattr__(options, "frozen", bool(opts.freeze_settings))
    removed = remove_leftover_temp_files(paths, options)
    if removed:
        log.info("Removed %d temp file(s) left by an interrupted write: %s", len(removed),
                 ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    if opts.ckpt and not Path(opts.ckpt).expanduser().is_file():
        raise StartupError(f"--ckpt: no such file: {opts.ckpt}")
    services = build_services(opts, paths, options)
    from PIL import Image

    # PIL's own decompression-bomb guard, as a backstop behind the header checks (core/limits.py).
    Image.MAX_IMAGE_PIXELS = 4 * max(services.limits.max_input_pixels, services.limits.max_pixels)
    return services, warnings


def create_app(services: Services, *, callbacks=None, extensions=()):
    """The FastAPI app with the API (--api) and the UI mounted on it.

    `callbacks` (a script_callbacks.CallbackRegistry) and `extensions` come from
    load_extensions(); without them the app has no extension hooks.
    """
    from fastapi import FastAPI
    from starlette.routing import Mount

    opts = services.cmd_opts
    app = FastAPI(title="Stable Diffusion web UI", docs_url="/docs", redoc_url=None)
    # --- API + trust boundary (modules/api) ------------------------------------------------
    # Host check, CORS and auth are middleware around everything; the API routes go in before
    # the UI mount, which at "/" would otherwise catch /sdapi/*.
    from modules.api import auth, setup_api

    # Input limits (docs/security.md): an oversized body is refused before it is read. Added first,
    # so the Host check that setup_api installs stays the outermost middleware.
    from modules.api.body_limit import BodySizeLimit

    app.add_middleware(BodySizeLimit, max_bytes=services.limits.max_body_bytes,
                       upload_bytes=services.limits.max_upload_bytes)
    gradio_credentials = read_gradio_credentials(opts)
    api = setup_api(app, services, gradio_credentials=gradio_credentials)
    # --------------------------------------------------------------------------------------
    if not opts.nowebui:
        import gradio as gr

        from modules.ui.app import build_ui

        extension_tabs = []
        if callbacks is not None:
            callbacks.before_ui()
            extension_tabs = callbacks.ui_tabs()
        from modules.extensions.loader import page_assets

        extension_head, extension_css = page_assets(extensions)
        ui = build_ui(services, extension_tabs=extension_tabs, extension_head=extension_head,
                      extension_css=extension_css, extensions=extensions)
        ui.blocks.queue(default_concurrency_limit=1)
        # The UI's login: --gradio-auth, else --api-auth's credentials (the UI's event API can do
        # anything the API can, so it is never left open beside a locked API).
        credentials = auth.ui_credentials_for(opts, gradio_credentials)
        routes_before_ui = list(app.routes)  # API: to tell the UI's routes apart (see below)
        gr.mount_gradio_app(
            app, ui.blocks, path=opts.subpath or "/",
            auth=credentials or None,
            auth_message="Log in to Stable Diffusion web UI" if credentials else None,
            allowed_paths=[str(services.paths.outputs_dir)],
            footer_links=["api", "settings"] if opts.api else ["settings"],
            css=ui.css, js=ui.js, head=ui.head,
            show_error=True, ssr_mode=False, mcp_server=False, pwa=False,
            max_file_size=services.limits.max_upload_bytes,
        )
        # The UI has its own login page; without its session only that page is served.
        ui_routes = [r for r in app.routes if not any(r is old for old in routes_before_ui)]
        api.attach_ui(ui_routes, mount=next(r for r in ui_routes if isinstance(r, Mount)))
        from modules.api.extra_networks import install_preview_routes  # card previews, behind the UI's login

        install_preview_routes(next(r for r in ui_routes if isinstance(r, Mount)).app, services)
    elif callbacks is not None:
        callbacks.before_ui()   # A1111's API-only mode runs it too: extensions register their networks there
    if callbacks is not None:
        _run_app_started(app, callbacks, None if opts.nowebui else ui.blocks)
    return app


def _run_app_started(app, callbacks, demo) -> None:
    """on_app_started(demo, app), then move the routes it added in front of the UI mount:
    a mount at "/" matches everything, so a route after it is never reached. Being in front
    of the mount also puts them behind the Basic auth middleware (it exempts only the UI)."""
    from starlette.routing import Mount

    before = list(app.router.routes)
    callbacks.app_started(demo, app)
    added = [r for r in app.router.routes if not any(r is old for old in before)]
    if not added:
        return
    routes = [r for r in app.router.routes if not any(r is new for new in added)]
    mount_at = next((i for i, r in enumerate(routes) if isinstance(r, Mount)), len(routes))
    app.router.routes[:] = routes[:mount_at] + added + routes[mount_at:]


def load_extensions(argv: list[str] | None):
    """Discover extensions and run their install.py: before flags are parsed, since preload.py adds flags.

    Returns (extensions, callback registry).
    """
    from modules.extensions import loader as extensions, callbacks as script_callbacks

    callbacks = script_callbacks.set_default(script_callbacks.CallbackRegistry())
    early = extensions.early_flags(argv)
    paths = AppPaths.from_opts(early)
    disabled, mode = extensions.read_disable_settings(paths.config_file)
    if early.disable_all_extensions:
        mode = "all"
    elif early.disable_extra_extensions and mode == "none":
        mode = "extra"
    found = extensions.discover(paths.extensions_dir, paths.extensions_builtin_dir, disabled=disabled, mode=mode)
    if not early.skip_install:
        extensions.run_installers(found, paths.install_dir)
    return found, callbacks


def attach_extensions(services: Services, found, callbacks) -> None:
    """Import the extensions' scripts and connect their callbacks and Script classes to the services."""
    from modules import scripts as a1111_scripts, shared
    from modules.extensions import loader as extensions, scripts

    shared.bind(services)  # before the imports: scripts read shared.opts at import time
    from modules.extensions.controlnet_external_code import install_aliases
    install_aliases()  # sd-webui-controlnet's external_code import paths, for extensions that drive ControlNet
    script_modules = extensions.load_scripts(found, callbacks)
    extensions.log_summary(found)
    services.extensions = list(found)
    services.scripts = scripts.ScriptRegistry.from_modules(script_modules, found)
    a1111_scripts.install(services.scripts)  # A1111's scripts.scripts_txt2img and friends
    services.models.add_loaded_listener(callbacks.model_loaded)
    services.generation.save_hooks = (callbacks.before_image_saved, callbacks.image_saved)
    services.callbacks = callbacks
    services.generation.sampling_hooks = callbacks.sampling_hooks
    callbacks.ui_settings()  # extensions add settings through shared.opts.add_option


def serve(app, sock: socket.socket, services: Services) -> None:
    import uvicorn

    opts = services.cmd_opts
    host, port = sock.getsockname()[:2]
    scheme = "https" if opts.tls_certfile else "http"
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"{scheme}://{shown_host}:{port}{(opts.subpath or '').rstrip('/')}"
    config = uvicorn.Config(
        app, log_level="warning", timeout_keep_alive=opts.timeout_keep_alive,
        ssl_keyfile=opts.tls_keyfile, ssl_certfile=opts.tls_certfile,
    )
    server = uvicorn.Server(config)
    if services.callbacks is not None:
        services.callbacks.unload_at_shutdown(app)  # on_script_unloaded when the server stops

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"Running on local URL:  {url}", flush=True)
            if host in ("0.0.0.0", "::"):
                print(f"Listening on all interfaces ({host}): use this machine's LAN address with port {port}.", flush=True)
            if opts.autolaunch:
                import webbrowser

                webbrowser.open(url)
            if not opts.skip_load_model_at_start:
                services.generation.preload()

    threading.Thread(target=announce, name="announce", daemon=True).start()
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    # Logging first at INFO: extension problems are reported before the flags are parsed.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from modules.extensions import loader as extensions

    found, callbacks = load_extensions(argv)
    try:
        parsed = cmd_args.parse_args(argv, preloaders=extensions.preloaders(found))
    except FlagError as err:
        print(f"webui: error: {err}", file=sys.stderr)
        return 2
    opts = parsed.opts
    logging.getLogger().setLevel(getattr(logging, (opts.loglevel or "INFO").upper(), logging.INFO))
    for notice in parsed.notices:
        print(notice, file=sys.stderr)
    if opts.exit or opts.test:
        return 0  # launcher-only modes; webui.sh acts on them before we run
    refusal = cmd_args.login_required_error(opts)
    if refusal:
        print(f"webui: error: {refusal}", file=sys.stderr)
        return 2
    exposure = cmd_args.network_exposure(opts)
    if exposure and not cmd_args.has_login(opts):
        print(f"Warning: {exposure} with --insecure-no-auth: anyone who can reach this server can use it, "
              f"including everything the API can do.", file=sys.stderr)
    try:
        if opts.share:
            print("Note: --share needs Gradio's public tunnel, which this server does not use; use --listen to reach it on your network.", file=sys.stderr)
        services, warnings = prepare(parsed)
        for warning in warnings:
            print(f"Warning: {warning}", file=sys.stderr)
        read_gradio_credentials(opts)  # fail fast on a bad auth file, before binding
        sock = open_listening_socket(cmd_args.bind_host(opts), cmd_args.bind_port(opts))
        started = time.perf_counter()
        attach_extensions(services, found, callbacks)
        app = create_app(services, callbacks=callbacks, extensions=found)
        log.info("UI built in %.1fs", time.perf_counter() - started)
        # Jobs queued before a restart are queued again (the running one is marked interrupted): after the
        # extensions are attached, so they run with the same save and sampling hooks as new jobs.
        services.queue.restore()
        serve(app, sock, services)
    except (StartupError, FlagError) as err:
        print(f"webui: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
