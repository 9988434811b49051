"""A1111's ``modules.paths``: the folder strings extensions read (set by ``shared.bind``)."""
from __future__ import annotations

from modules.core.paths import INSTALL_DIR, AppPaths  # noqa: F401 - re-exported

script_path = str(INSTALL_DIR)
data_path = str(INSTALL_DIR)
models_path = str(INSTALL_DIR / "models")
