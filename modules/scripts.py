"""A1111's ``modules.scripts``: the Script API extensions subclass, over modules/extensions/scripts.py."""
from __future__ import annotations

from pathlib import Path

from modules.extensions import loader as _loader
from modules.extensions.scripts import (AlwaysVisible, PostprocessBatchListArgs, PostprocessImageArgs,  # noqa: F401
                                            Script, ScriptArgInfo, ScriptArgsError, ScriptClassData, ScriptRegistry,
                                            ScriptRunner)

# A1111's module-level names, set by webui.py through install(); extensions read them.
scripts_data: list[ScriptClassData] = []
scripts_txt2img: ScriptRunner | None = None
scripts_img2img: ScriptRunner | None = None


def install(registry: ScriptRegistry) -> None:
    global scripts_txt2img, scripts_img2img
    scripts_data[:] = registry.classes
    scripts_txt2img, scripts_img2img = registry.txt2img, registry.img2img


def basedir() -> str:
    """The folder of the extension whose script is being imported now (A1111: call it at import time,
    e.g. `base = scripts.basedir()` at the top of scripts/x.py); the app folder otherwise."""
    current = _loader.importing_script()
    if current is not None:
        return str(Path(current).resolve().parent.parent)
    return str(Path(__file__).resolve().parent.parent)
