"""Seed resolution, without torch (scripts fix seeds at startup-light import time)."""
from __future__ import annotations

import random


def resolve_seed(seed: int | str | None) -> int:
    """-1 (or None, "", any negative, non-numeric text) -> a fresh random seed.

    A1111 draws ``random.randrange(4294967294)``, i.e. [0, 2**32 - 2].
    Non-negative seeds are returned unchanged.
    """
    if isinstance(seed, str):
        try:
            seed = int(seed.strip())
        except ValueError:
            seed = None
    if seed is None or int(seed) < 0:
        return int(random.randrange(4294967294))
    return int(seed)
