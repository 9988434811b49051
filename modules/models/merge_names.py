"""The checkpoint merger's choices and its error: torch-free, for the UI and API to list and catch
without importing the merger itself (models/merger.py)."""
from __future__ import annotations

NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE = "No interpolation", "Weighted sum", "Add difference"
INTERP_METHODS = (NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE)
FORMATS = ("safetensors", "ckpt")
# Where the merged model's sidecar .yaml comes from (A1111's "Copy config from"), by index as A1111 sends it.
CONFIG_SOURCES = ("A, B or C", "B", "C", "Don't")


class MergeError(ValueError):
    """A merge that cannot be done; the message says why and is shown to the user as-is."""


class MergeInterrupted(RuntimeError):
    """The user interrupted the merge; nothing was written."""
