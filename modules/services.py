"""The objects the app is made of, built once by webui.py and handed to the UI and API.

Nothing here is a module-level global: tests build as many as they like.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from modules.options import Options
from modules.paths import AppPaths


@dataclass
class Services:
    cmd_opts: argparse.Namespace
    paths: AppPaths
    options: Options
