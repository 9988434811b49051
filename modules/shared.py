"""A1111's ``modules.shared`` for extensions: opts, state, cmd_opts, sd_model.

Only extensions use this module; the core is handed its objects explicitly (see
modules/services.py). webui.py calls :func:`bind` once, before extension scripts are
imported, so ``from modules.shared import opts`` at import time gets the live objects.
"""
from __future__ import annotations

from typing import Any

from modules.options import OptionInfo, Options  # noqa: F401 - re-exported for extensions

opts: Options | None = None
state: Any = None          # modules.jobs.JobState of the running job
cmd_opts: Any = None       # argparse.Namespace of the parsed flags
_services: Any = None


def bind(services: Any) -> None:
    global opts, state, cmd_opts, _services
    _services = services
    opts = services.options
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
        return None if _services is None else _services.models.loaded_model
    if name == "services":
        return _services
    raise AttributeError(f"module 'modules.shared' has no attribute {name!r}")
