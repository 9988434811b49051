"""A1111's ``modules.shared`` for extensions: opts, state, cmd_opts, sd_model.

Only extensions use this module; the core is handed its objects explicitly (see
modules/services.py). webui.py calls :func:`bind` once, before extension scripts are
imported, so ``from modules.shared import opts`` at import time gets the live objects.
"""
from __future__ import annotations

from typing import Any

from modules.core.options import OptionInfo, Options  # noqa: F401 - re-exported for extensions
from modules.extensions import context

opts: Any = None           # the settings; inside a job, that job's view of them (context.JobAwareOptions)
state: Any = None          # modules.core.jobs.JobState of the running job
cmd_opts: Any = None       # argparse.Namespace of the parsed flags


def bind(services: Any) -> None:
    global opts, state, cmd_opts
    context.bind(services)
    if services is None:
        opts = state = cmd_opts = None
        return
    opts = context.JobAwareOptions(services.options, services.generation.current_options)
    state = services.generation.state
    cmd_opts = services.cmd_opts
    # A1111's modules.paths strings, which extensions read (models_path, data_path, script_path).
    from modules import paths

    paths.models_path = str(services.paths.models_dir)
    paths.data_path = str(services.paths.data_dir)
    paths.script_path = str(services.paths.install_dir)


def __getattr__(name: str) -> Any:
    # sd_model is read on every access, through the services: None until a model is loaded.
    if name == "sd_model":
        services = context.services()
        model = None if services is None else services.models.loaded_model
        if model is not None:  # an extension may write weights: none may still be backed by the file
            model.wait_materialised()
        return model
    if name == "services":
        return context.services()
    if name == "sd_upscalers":  # A1111's list of upscalers; extensions read .name (and .scale)
        from modules.engine.upscaling import upscaler_entries
        return upscaler_entries()
    raise AttributeError(f"module 'modules.shared' has no attribute {name!r}")
