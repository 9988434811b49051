"""Callbacks that extensions register, with AUTOMATIC1111's function names.

Extensions call ``script_callbacks.on_app_started(fn)`` at import time, so the module
functions reach one default :class:`CallbackRegistry`; webui.py creates it and installs
it with :func:`set_default`. Everything else is state of the registry object, so tests
can build as many as they like.

Each entry remembers the file that registered it; a callback that raises is logged with
that name and skipped, never breaking the code that fired it.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from modules.core.saving import ImageSaveParams  # noqa: F401 - A1111 extensions import it from here

log = logging.getLogger(__name__)

KINDS = (
    "app_started", "model_loaded", "ui_tabs", "ui_settings", "before_image_saved", "image_saved",
    "cfg_denoiser", "cfg_denoised", "infotext_pasted", "before_ui", "script_unloaded",
)
# A1111 callbacks this app accepts (so an extension registering them still loads) but never calls:
# there is no matching moment here (no k-diffusion noise/CFG internals, no per-component hooks,
# no optimizers/UNet lists, no UI reload, no training tab).
NEVER_CALLED = (
    "before_reload", "ui_train_tabs", "extra_noise", "cfg_after_cfg", "before_component", "after_component",
    "image_grid", "list_optimizers", "list_unets", "before_token_counter",
)


@dataclass
class CallbackEntry:
    script: str          # the file that registered it (an extension's scripts/x.py)
    callback: Callable
    name: str | None = None


# Payloads, with A1111's attribute names: extensions read and modify them in place.
# (ImageSaveParams is modules.images'.)

@dataclass
class CFGDenoiserParams:
    x: Any
    image_cond: Any
    sigma: Any
    sampling_step: int
    total_sampling_steps: int
    text_cond: Any = None
    text_uncond: Any = None
    denoiser: Any = None


@dataclass
class CFGDenoisedParams:
    x: Any
    sampling_step: int
    total_sampling_steps: int
    inner_model: Any = None


_THIS_FILE = os.path.normcase(os.path.abspath(__file__))


def _caller_file() -> str:
    """The first file on the stack outside this module: who is registering."""
    frame = sys._getframe(1)
    while frame is not None and os.path.normcase(os.path.abspath(frame.f_code.co_filename)) == _THIS_FILE:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else "<unknown>"


@dataclass
class CallbackRegistry:
    callbacks: dict[str, list[CallbackEntry]] = field(default_factory=lambda: {k: [] for k in (*KINDS, *NEVER_CALLED)})
    # Set by the extension loader while it imports a script, so entries name that file even
    # when the registration goes through a helper module.
    current_script: str | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def add(self, kind: str, callback: Callable, *, name: str | None = None, script: str | None = None) -> None:
        if kind not in self.callbacks:
            raise ValueError(f"unknown callback kind {kind!r}")
        if not callable(callback):
            raise TypeError(f"{kind} callback must be callable, got {callback!r}")
        entry = CallbackEntry(script=script or self.current_script or _caller_file(), callback=callback, name=name)
        if kind in NEVER_CALLED:
            log.info("%s registers an on_%s callback; this app accepts it but never calls it", entry.script, kind)
        with self._lock:
            self.callbacks[kind].append(entry)

    def run(self, kind: str, *args: Any) -> list[Any]:
        """Call every `kind` callback in registration order; the results of those that did not raise."""
        with self._lock:
            entries = list(self.callbacks[kind])
        results = []
        for entry in entries:
            try:
                results.append(entry.callback(*args))
            except Exception:
                log.exception("Error running %s callback %s from %s", kind,
                              getattr(entry.callback, "__name__", entry.callback), entry.script)
        return results

    def remove_script(self, script: str) -> None:
        with self._lock:
            for kind, entries in self.callbacks.items():
                self.callbacks[kind] = [e for e in entries if e.script != script]

    def remove_function(self, callback: Callable) -> None:
        with self._lock:
            for kind, entries in self.callbacks.items():
                self.callbacks[kind] = [e for e in entries if e.callback != callback]

    def clear(self) -> None:
        with self._lock:
            for entries in self.callbacks.values():
                entries.clear()

    # -- firing, one method per kind (the names A1111's core uses) --------------------------
    def app_started(self, demo: Any, app: Any) -> None:
        self.run("app_started", demo, app)

    def model_loaded(self, sd_model: Any) -> None:
        self.run("model_loaded", sd_model)

    def ui_tabs(self) -> list[tuple[Any, str, str]]:
        """Each callback returns a list of (blocks, title, elem_id); bad shapes are logged and dropped."""
        tabs = []
        for result in self.run("ui_tabs"):
            for item in result or []:
                if isinstance(item, (tuple, list)) and len(item) >= 2:
                    blocks, title = item[0], item[1]
                    elem_id = item[2] if len(item) > 2 else str(title).lower().replace(" ", "_")
                    tabs.append((blocks, str(title), str(elem_id)))
                else:
                    log.error("on_ui_tabs callback returned %r; expected (blocks, title, elem_id)", item)
        return tabs

    def ui_settings(self) -> None:
        self.run("ui_settings")

    def before_image_saved(self, params: ImageSaveParams) -> None:
        self.run("before_image_saved", params)

    def image_saved(self, params: ImageSaveParams) -> None:
        self.run("image_saved", params)

    def cfg_denoiser(self, params: CFGDenoiserParams) -> None:
        self.run("cfg_denoiser", params)

    def cfg_denoised(self, params: CFGDenoisedParams) -> None:
        self.run("cfg_denoised", params)

    def infotext_pasted(self, infotext: str, params: dict) -> None:
        self.run("infotext_pasted", infotext, params)

    def sampling_hooks(self) -> Any:
        """sampling.SamplingHooks that fire on_cfg_denoiser/on_cfg_denoised, or None when nobody
        listens (no per-step cost then). Called per job, when torch is loaded anyway."""
        if not (self.callbacks["cfg_denoiser"] or self.callbacks["cfg_denoised"]):
            return None
        from modules.engine.sampling import SamplingHooks

        def denoised(x: Any, step: int, total: int, inner_model: Any = None) -> None:
            # inner_model is the diffusers UNet here (A1111 passes its k-diffusion model wrapper).
            self.cfg_denoised(CFGDenoisedParams(x=x, sampling_step=step, total_sampling_steps=total,
                                                inner_model=inner_model))

        # The denoiser's own params object (sampling.DenoiserParams) has A1111's CFGDenoiserParams fields.
        return SamplingHooks(on_cfg_denoiser=[self.cfg_denoiser], on_cfg_denoised=[denoised])

    def before_ui(self) -> None:
        self.run("before_ui")

    def script_unloaded(self) -> None:
        self.run("script_unloaded")

    def unload_at_shutdown(self, app: Any) -> None:
        """Fire on_script_unloaded when the ASGI `app` shuts down. Through its lifespan: uvicorn re-raises
        SIGTERM after its own shutdown, so code after its run() would never see a plain `kill`."""
        import contextlib

        inner = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(scope_app: Any):
            async with inner(scope_app) as state:
                try:
                    yield state
                finally:
                    self.script_unloaded()
        app.router.lifespan_context = lifespan


_default: CallbackRegistry | None = None
_default_lock = threading.Lock()


def set_default(registry: CallbackRegistry) -> CallbackRegistry:
    """webui.py installs the app's registry here before extensions are imported."""
    global _default
    with _default_lock:
        _default = registry
    return registry


def default() -> CallbackRegistry:
    global _default
    with _default_lock:
        if _default is None:  # a script imported outside webui (a unit test): give it a registry
            _default = CallbackRegistry()
        return _default


# -- A1111's module-level API ----------------------------------------------------------------
def on_app_started(callback: Callable[[Any, Any], None], *, name: str | None = None) -> None:
    """callback(demo, app) after the FastAPI app and the UI are built; add routes to `app` here."""
    default().add("app_started", callback, name=name)


def on_model_loaded(callback: Callable[[Any], None], *, name: str | None = None) -> None:
    default().add("model_loaded", callback, name=name)


def on_ui_tabs(callback: Callable[[], list], *, name: str | None = None) -> None:
    default().add("ui_tabs", callback, name=name)


def on_ui_settings(callback: Callable[[], None], *, name: str | None = None) -> None:
    default().add("ui_settings", callback, name=name)


def on_before_image_saved(callback: Callable[[ImageSaveParams], None], *, name: str | None = None) -> None:
    default().add("before_image_saved", callback, name=name)


def on_image_saved(callback: Callable[[ImageSaveParams], None], *, name: str | None = None) -> None:
    default().add("image_saved", callback, name=name)


def on_cfg_denoiser(callback: Callable[[CFGDenoiserParams], None], *, name: str | None = None) -> None:
    default().add("cfg_denoiser", callback, name=name)


def on_cfg_denoised(callback: Callable[[CFGDenoisedParams], None], *, name: str | None = None) -> None:
    default().add("cfg_denoised", callback, name=name)


def on_infotext_pasted(callback: Callable[[str, dict], None], *, name: str | None = None) -> None:
    default().add("infotext_pasted", callback, name=name)


def on_before_ui(callback: Callable[[], None], *, name: str | None = None) -> None:
    default().add("before_ui", callback, name=name)


def on_script_unloaded(callback: Callable[[], None], *, name: str | None = None) -> None:
    default().add("script_unloaded", callback, name=name)


def remove_current_script_callbacks() -> None:
    """Drop every callback the calling file registered (A1111: scripts call this on reload)."""
    registry = default()
    registry.remove_script(registry.current_script or _caller_file())


def remove_callbacks_for_function(callback: Callable) -> None:
    default().remove_function(callback)


def _never_called(kind: str) -> Callable[..., None]:
    def register(callback: Callable, *, name: str | None = None) -> None:
        default().add(kind, callback, name=name)
    register.__name__ = f"on_{kind}"
    register.__doc__ = f"Accepted for A1111 compatibility; this app never calls on_{kind} callbacks."
    return register


on_before_reload = _never_called("before_reload")
on_ui_train_tabs = _never_called("ui_train_tabs")
on_extra_noise = _never_called("extra_noise")
on_cfg_after_cfg = _never_called("cfg_after_cfg")
on_before_component = _never_called("before_component")
on_after_component = _never_called("after_component")
on_image_grid = _never_called("image_grid")
on_list_optimizers = _never_called("list_optimizers")
on_list_unets = _never_called("list_unets")
on_before_token_counter = _never_called("before_token_counter")
