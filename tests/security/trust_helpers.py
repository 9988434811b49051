"""tests/conftest.py's helpers (start_server, run_webui, free_port...) for the tests in tests/security.

pytest imports tests/conftest.py as the module ``conftest``; a conftest.py in this folder would take
that name, so the helpers are found by the file's path instead of by ``from conftest import``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _tests_conftest():
    wanted = TESTS / "conftest.py"
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == wanted:
            return module
    spec = importlib.util.spec_from_file_location("tests_conftest", wanted)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tests_conftest"] = module
    spec.loader.exec_module(module)
    return module


_conftest = _tests_conftest()
ROOT = _conftest.ROOT
free_port = _conftest.free_port
run_webui = _conftest.run_webui
start_server = _conftest.start_server
ServerProcess = _conftest.ServerProcess
