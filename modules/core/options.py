"""Typed settings persisted to config.json, and the read-only snapshot each job sees.

What a setting is (OptionInfo, sections) lives in option_info.py; A1111's full key set in
options_a1111.py.
"""
from __future__ import annotations

import json
import math
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from modules.core.atomic import atomic_write_json
from modules.core.limits import is_dir_config_key
from modules.core.option_info import (  # noqa: F401 - the settings API is imported from here
    COMPAT_NOTE, EXT, LIVE, PATHS, SAMPLER, SAVING, SD, UI, OptionError, OptionInfo, Section,
)

log = logging.getLogger(__name__)


def _coerce(key: str, info: OptionInfo, value: Any) -> Any:
    """Bring a value (from JSON, the API or a UI widget) to the setting's type."""
    default = info.default
    if default is None and info.value_type is not None:
        if value is None or value == "":
            return None  # "nothing chosen"
        default = info.value_type()
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if number != int(number):
                raise TypeError
            value = int(number)
        elif isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        elif isinstance(default, list):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            value = list(value)
        elif isinstance(default, str):
            if value is None:
                value = ""
            if not isinstance(value, (str, int, float)):
                raise TypeError
            value = str(value)
    except (TypeError, ValueError):
        raise OptionError(f"setting {key!r} expects a {type(default).__name__}, got {value!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"setting {key!r}: {value} is not a finite number")
    if info.choices is not None and not callable(info.choices) and value is not None:
        allowed = list(info.choices)
        items = value if isinstance(value, list) else [value]
        if allowed and any(item not in allowed for item in items):
            raise OptionError(f"setting {key!r}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if info.minimum is not None and value < info.minimum or info.maximum is not None and value > info.maximum:
            raise OptionError(f"setting {key!r} must be between {info.minimum} and {info.maximum}, got {value}")
    return value


class Options:
    """Settings values over a registry of OptionInfo templates.

    Values of keys nobody registered (an extension that is disabled today)
    are kept and written back, so no user data is lost.
    """

    def __init__(self, path: Path | None = None, templates: Iterable[tuple[str, OptionInfo]] = (), *, frozen: bool = False):
        object.__setattr__(self, "_lock", threading.RLock())
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "frozen", frozen)
        object.__setattr__(self, "templates", {})
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "_listeners", {})
        object.__setattr__(self, "dir_config_locked", False)  # set by build_services from the flags
        for key, info in templates:
            self.add_option(key, info)

    # -- registry -----------------------------------------------------
    def add_option(self, key: str, info: OptionInfo) -> None:
        self.templates[key] = info
        if info.onchange is not None:
            self.onchange(key, info.onchange, call=False)

    def onchange(self, key: str, func: Callable[[], None], call: bool = True) -> None:
        self._listeners.setdefault(key, []).append(func)
        if call:
            func()

    def sections(self) -> dict[Section, list[str]]:
        out: dict[Section, list[str]] = {}
        for key, info in self.templates.items():
            if not info.hidden:
                out.setdefault(info.section, []).append(key)
        return out

    # -- values -------------------------------------------------------
    def __getattr__(self, key: str) -> Any:
        data = object.__getattribute__(self, "data")
        if key in data:
            return data[key]
        templates = object.__getattribute__(self, "templates")
        if key in templates:
            return templates[key].default
        raise AttributeError(f"no setting named {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.__dict__:
            object.__setattr__(self, key, value)
        else:
            self.set(key, value)

    def lock_dir_config(self, locked: bool = True) -> None:
        """Folders, file name patterns and formats may not be changed at all (a network-reachable
        server without --allow-dir-config, or --hide-ui-dir-config)."""
        object.__setattr__(self, "dir_config_locked", bool(locked))

    def is_locked(self, key: str) -> bool:
        """Whether the UI may not change `key` (the API never may: see `api_restricted`)."""
        return self.dir_config_locked and is_dir_config_key(key)

    def api_restricted(self, key: str) -> bool:
        """Whether the API (POST /options, override_settings) may not change `key`."""
        info = self.templates.get(key)
        return is_dir_config_key(key) or bool(info is not None and info.restrict_api)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            return default

    def get_default(self, key: str) -> Any:
        info = self.templates.get(key)
        return None if info is None else info.default

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        """Validate and store one value; True when it changed. Does not save."""
        if self.frozen:
            raise OptionError("settings are frozen (--freeze-settings)")
        info = self.templates.get(key)
        if info is None:
            raise OptionError(f"unknown setting {key!r}")
        if is_api and self.api_restricted(key):
            raise OptionError(f"setting {key!r} cannot be changed through the API")
        value = _coerce(key, info, value)
        with self._lock:
            old = self.get(key)
            if old == value:
                return False
            if self.is_locked(key):
                raise OptionError(f"setting {key!r} can only be changed in config.json on this server "
                                  f"(it is reachable from other machines; see --allow-dir-config)")
            self.data[key] = value
        if run_callbacks:
            for func in self._listeners.get(key, []):
                try:
                    func()
                except Exception:
                    with self._lock:
                        self.data[key] = old
                    raise
        return True

    def validate_values(self, values: dict[str, Any]) -> None:
        """Check values without storing them; raises OptionError naming the first bad one."""
        for key, value in values.items():
            info = self.templates.get(key)
            if info is None:
                raise OptionError(f"unknown setting {key!r}")
            _coerce(key, info, value)

    def as_dict(self) -> dict[str, Any]:
        """Every registered setting with its current value, plus unknown stored keys."""
        with self._lock:
            out = {key: self.get(key) for key in self.templates}
            for key, value in self.data.items():
                out.setdefault(key, value)
            return out

    def snapshot(self, overrides: dict[str, Any] | None = None) -> OptionsSnapshot:
        """The current values, frozen for one job, with that job's overrides applied."""
        with self._lock:
            return OptionsSnapshot(self.templates, self.as_dict()).with_overrides(overrides)

    # -- persistence --------------------------------------------------
    def load(self) -> list[str]:
        """Read the file; returns user-facing warnings. Never raises on bad content."""
        warnings: list[str] = []
        if self.path is None or not self.path.exists():
            return warnings
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("the top level is not an object")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            backup = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                self.path.replace(backup)
                where = f"it was moved to {backup}"
            except OSError as move_err:
                where = f"it could not be moved aside ({move_err})"
            warnings.append(f"Settings file {self.path} could not be read ({err}); {where} and defaults are used.")
            return warnings
        with self._lock:
            for key, value in raw.items():
                info = self.templates.get(key)
                if info is None:
                    self.data[key] = value  # keep: belongs to an extension not loaded now
                    continue
                try:
                    self.data[key] = _coerce(key, info, value)
                except OptionError as err:
                    warnings.append(f"Ignored a bad value in {self.path.name}: {err}; using the default.")
        return warnings

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            atomic_write_json(self.path, dict(self.data))


class OptionsSnapshot:
    """Settings as one job sees them: the values when it started, with its own overrides.

    Read-only and never saved, so a request's override_settings are invisible to every other
    client and never reach config.json; a settings change made while the job runs applies
    to the next job.
    """

    def __init__(self, templates: dict[str, OptionInfo], values: dict[str, Any]):
        object.__setattr__(self, "_templates", templates)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if key in values:
            return values[key]
        raise AttributeError(f"no setting named {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        raise OptionError(f"a job's settings are read-only ({key!r}); pass override_settings instead")

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def with_overrides(self, overrides: dict[str, Any] | None) -> "OptionsSnapshot":
        """A new snapshot with `overrides` validated and applied (this one is unchanged)."""
        if not overrides:
            return self
        values = dict(self._values)
        for key, value in overrides.items():
            info = self._templates.get(key)
            if info is None:
                raise OptionError(f"unknown setting {key!r}")
            values[key] = _coerce(key, info, value)
        return OptionsSnapshot(self._templates, values)


def default_templates() -> list[tuple[str, OptionInfo]]:
    """The settings the core knows, then the rest of A1111's keys (modules/core/options_a1111.py);
    extensions add theirs with add_option."""
    from modules.core.options_a1111 import a1111_templates

    core = _core_templates()
    defined = {key for key, _ in core}
    return core + [(key, info) for key, info in a1111_templates() if key not in defined]


def _core_templates() -> list[tuple[str, OptionInfo]]:
    return [
        ("samples_save", OptionInfo(True, "Always save all generated images", section=SAVING)),
        ("samples_format", OptionInfo("png", "File format for images", choices=("png", "jpg", "jpeg", "webp"), section=SAVING)),
        ("samples_filename_pattern", OptionInfo("", "Images filename pattern (empty: NNNNN-SEED)", section=SAVING)),
        ("save_images_add_number", OptionInfo(True, "Add number to filename when saving", section=SAVING)),
        ("grid_save", OptionInfo(True, "Always save all generated image grids", section=SAVING)),
        ("grid_format", OptionInfo("png", "File format for grids", choices=("png", "jpg", "jpeg", "webp"), section=SAVING)),
        ("return_grid", OptionInfo(True, "Show grid in gallery", section=SAVING)),
        ("n_rows", OptionInfo(-1, "Grid row count; -1 for autodetect and 0 for it to be same as batch size", minimum=-1, maximum=16, step=1, section=SAVING)),
        ("grid_prevent_empty_spots", OptionInfo(False, "Prevent empty spots in grid (when set to autodetect)", section=SAVING)),
        ("grid_background_color", OptionInfo("#ffffff", "Grid background color", section=SAVING)),
        ("enable_pnginfo", OptionInfo(True, "Save text information about generation parameters as chunks to png files", section=SAVING)),
        ("save_txt", OptionInfo(False, "Create a text file with infotext next to every image", section=SAVING)),
        ("jpeg_quality", OptionInfo(80, "Quality for saved jpeg and webp images", minimum=1, maximum=100, step=1, section=SAVING)),
        ("webp_lossless", OptionInfo(False, "Use lossless compression for webp images", section=SAVING)),
        ("outdir_samples", OptionInfo("", "Output directory for images; if empty, defaults to the three directories below", section=PATHS)),
        ("outdir_txt2img_samples", OptionInfo("", "Output directory for txt2img images (empty: outputs/txt2img-images)", section=PATHS)),
        ("outdir_img2img_samples", OptionInfo("", "Output directory for img2img images (empty: outputs/img2img-images)", section=PATHS)),
        ("outdir_extras_samples", OptionInfo("", "Output directory for images from extras (empty: outputs/extras-images)", section=PATHS)),
        ("outdir_txt2img_grids", OptionInfo("", "Output directory for txt2img grids (empty: outputs/txt2img-grids)", section=PATHS)),
        ("outdir_img2img_grids", OptionInfo("", "Output directory for img2img grids (empty: outputs/img2img-grids)", section=PATHS)),
        ("sd_model_checkpoint", OptionInfo("", "Stable Diffusion checkpoint", kind="dropdown", section=SD)),
        ("sd_checkpoints_limit", OptionInfo(1, "Maximum number of checkpoints loaded at the same time", minimum=1, maximum=10, step=1, section=SD)),
        ("sd_vae", OptionInfo("Automatic", "SD VAE", kind="dropdown", section=SD).info("Automatic: a VAE named like the checkpoint; None: the VAE baked into the checkpoint")),
        ("vae_tiling", OptionInfo("Automatic", "Tiled VAE: decode and encode large images in overlapping tiles", choices=("Automatic", "Always", "Never"), section=SD).info("Automatic: above the pixel budget below, or when memory is short (--lowvram, low-RAM mode)")),
        ("vae_tiling_pixels", OptionInfo(1024 * 1024, "Tiled VAE: pixel budget for Automatic (width x height above which tiles are used)", minimum=65536, maximum=16777216, step=65536, section=SD)),
        ("CLIP_stop_at_last_layers", OptionInfo(1, "Clip skip", minimum=1, maximum=12, step=1, section=SD, infotext="Clip skip")),
        ("eta_ancestral", OptionInfo(1.0, "Eta for ancestral samplers", minimum=0.0, maximum=1.0, step=0.01, section=SAMPLER)),
        ("eta_noise_seed_delta", OptionInfo(0, "Eta noise seed delta (ENSD)", section=SAMPLER, infotext="ENSD")),
        ("randn_source", OptionInfo("GPU", "Random number generator source", choices=("GPU", "CPU", "NV"), section=SAMPLER, infotext="RNG")),
        ("quicksettings_list", OptionInfo(["sd_model_checkpoint"], "Quicksettings list (settings shown at the top of the page)", kind="multiselect", section=UI).needs_restart()),
        ("show_progress_every_n_steps", OptionInfo(10, "Live preview display period (steps; 0 or -1: none while sampling)", minimum=-1, maximum=32, step=1, section=LIVE)),
        ("live_previews_enable", OptionInfo(True, "Show live previews of the created image", section=LIVE)),
        ("disabled_extensions", OptionInfo([], "Disabled extensions", section=EXT, hidden=True)),
        ("disable_all_extensions", OptionInfo("none", "Disable all extensions (preserves the list of disabled extensions)", choices=("none", "extra", "all"), section=EXT)),
        ("control_net_unit_count", OptionInfo(3, "ControlNet unit count (tabs in the ControlNet accordion)", minimum=1, maximum=10, step=1, section=SD).needs_restart()),
        ("control_net_no_detectmap", OptionInfo(False, "ControlNet: do not append the detected maps to the output", section=SD)),
        ("control_net_inpaint_blur_sigma", OptionInfo(7, "ControlNet inpaint_only: blur of the pasted-back border (pixels)", minimum=0, maximum=64, step=1, section=SD)),
    ]
