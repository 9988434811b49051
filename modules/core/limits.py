"""Every limit on what one request may ask for, in one place (docs/security.md, "Limits").

``Limits`` is built once from the flags (``Limits.from_opts``) by webui.py/services and handed to
the API, the UI and the core explicitly; nothing reads it from a module global.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["Limits", "LimitError", "DIR_CONFIG_KEYS", "is_dir_config_key", "check_finite"]

# Settings that choose where and under which name/format files are written: never from the API,
# and from the UI only on a local server (or with --allow-dir-config).
DIR_CONFIG_KEYS = frozenset({
    "save_txt", "samples_filename_pattern", "directories_filename_pattern", "samples_format", "grid_format",
    "save_to_dirs", "grid_save_to_dirs", "use_save_to_dirs_for_ui", "save_images_replace_action",
    "grid_zip_filename_pattern",
})


def is_dir_config_key(key: str) -> bool:
    return key in DIR_CONFIG_KEYS or key.startswith("outdir_")


class LimitError(ValueError):
    """A request over a limit or with a non-finite/absurd number; the message names the field."""


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 2048 * 2048           # output width x height (also hires target, extras, seed resize)
    max_side: int = 4096                    # one side of an output image (raised with --max-pixels)
    max_steps: int = 150
    max_images: int = 800                   # batch size x batch count (A1111's UI allows 8 x 100)
    max_xyz_cells: int = 256
    max_prompt_length: int = 20_000         # characters, prompt and negative prompt each
    max_input_images: int = 16              # init images, extras batch
    max_input_pixels: int = 4096 * 4096     # a decoded input image, checked from its header
    max_body_bytes: int = 50 * 1024 * 1024  # one HTTP request body
    max_upload_bytes: int = 50 * 1024 * 1024  # one file uploaded to the UI
    allow_dir_config: bool = False          # client may choose folders (--allow-dir-config)
    dir_config_locked: bool = False         # the UI may not change folder settings either

    @classmethod
    def from_opts(cls, opts: argparse.Namespace | None) -> "Limits":
        if opts is None:
            return cls()
        get = lambda name: getattr(opts, name, None)  # noqa: E731
        changes: dict[str, Any] = {}
        for flag, name in (("max_pixels", "max_pixels"), ("max_steps", "max_steps"), ("max_images", "max_images"),
                           ("max_xyz_cells", "max_xyz_cells"), ("max_prompt_length", "max_prompt_length"),
                           ("max_input_images", "max_input_images"), ("max_input_pixels", "max_input_pixels")):
            if get(flag) is not None:
                changes[name] = max(1, int(get(flag)))
        for flag, name in (("max_body_mb", "max_body_bytes"), ("max_upload_mb", "max_upload_bytes")):
            if get(flag) is not None:
                changes[name] = max(1, int(float(get(flag)) * 1024 * 1024))
        allow = bool(get("allow_dir_config"))
        non_local = bool(get("listen") or get("share") or get("server_name"))
        changes["allow_dir_config"] = allow
        changes["dir_config_locked"] = not allow and (non_local or bool(get("hide_ui_dir_config")))
        if "max_pixels" in changes:
            changes["max_side"] = max(cls.max_side, int(math.isqrt(changes["max_pixels"])))
        return cls(**changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- checks shared by the API, the UI and the core ---------------------------------
    def check_prompt(self, field: str, text: str | None) -> None:
        if text is not None and len(text) > self.max_prompt_length:
            raise LimitError(f"{field}: {len(text)} characters; at most {self.max_prompt_length} "
                             f"(--max-prompt-length)")

    def check_pixels(self, field: str, width: int, height: int) -> None:
        if width > self.max_side or height > self.max_side or width * height > self.max_pixels:
            raise LimitError(f"{field}: {width}x{height} is {width * height} pixels; at most {self.max_pixels} "
                             f"(--max-pixels) and {self.max_side} per side")

    def check_input_pixels(self, field: str, width: int, height: int) -> None:
        if width * height > self.max_input_pixels:
            raise LimitError(f"{field}: the image is {width}x{height} = {width * height} pixels; at most "
                             f"{self.max_input_pixels} (--max-input-pixels)")

    def check_count(self, field: str, count: int, limit: int, flag: str) -> None:
        if count > limit:
            raise LimitError(f"{field}: {count}; at most {limit} ({flag})")


def check_finite(field: str, value: Any) -> None:
    """NaN and infinities are refused (Python's json reads them)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise LimitError(f"{field}: {value} is not a finite number")
