"""A1111's ``modules.sd_models``: the checkpoint list and lookups, read from the running app's registry."""
from __future__ import annotations

from typing import Any

from modules.extensions import context
from modules.models.checkpoints import CheckpointInfo  # noqa: F401 - re-exported for extensions


def _models() -> Any:
    services = context.services()
    if services is None:
        raise RuntimeError("modules.sd_models: the app is not running yet")
    return services.models


def list_models() -> None:
    """Rescan the checkpoint folder (A1111's name)."""
    _models().refresh()


def get_closet_checkpoint_match(search: str) -> CheckpointInfo | None:
    """A1111's (misspelt) name: the checkpoint a title, name or hash prefix means, or None."""
    return _models().registry.get_closest(search)


def select_checkpoint() -> CheckpointInfo:
    return _models().selected_info()


def __getattr__(name: str) -> Any:
    # checkpoints_list / checkpoint_aliases are read live, as the folder can be rescanned.
    if name == "checkpoints_list":
        return {info.title: info for info in _models().registry.list()}
    if name == "checkpoint_aliases":
        return {key: info for info in reversed(_models().registry.list()) for key in info.ids}
    raise AttributeError(f"module 'modules.sd_models' has no attribute {name!r}")
