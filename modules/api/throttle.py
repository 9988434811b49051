"""Slowing down password guessing: per client address, for HTTP Basic auth and the UI's login.

After ``max_failures`` wrong passwords in a row from one address, that address is locked out for
``first_delay`` seconds; every further wrong password after a lockout doubles it, up to
``max_delay``. While locked out every attempt is answered 429 with ``Retry-After``, the right
password included (so a lockout says nothing about the password). A right password outside a
lockout clears the address's record; a record with no failure for ``forget_after`` seconds is
forgotten. Other addresses are never affected.

The clock is injected (``time.monotonic`` by default) so tests can move time by hand.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

MAX_FAILURES = 5
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 60.0
FORGET_AFTER_S = 15 * 60.0
MAX_CLIENTS = 10_000  # addresses remembered at once; the oldest are dropped first


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0
    last_failure: float = 0.0


class LoginThrottle:
    def __init__(self, *, max_failures: int = MAX_FAILURES, first_delay: float = FIRST_DELAY_S,
                 max_delay: float = MAX_DELAY_S, forget_after: float = FORGET_AFTER_S,
                 max_clients: int = MAX_CLIENTS, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_clients = max_clients
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._lock = threading.Lock()

    def _current(self, client: str, now: float) -> _Record | None:
        record = self._records.get(client)
        if record is not None and now >= record.locked_until and now - record.last_failure > self.forget_after:
            del self._records[client]
            return None
        return record

    def retry_after(self, client: str) -> float:
        """Seconds this client must wait before its next attempt is even checked (0: go ahead)."""
        with self._lock:
            now = self.clock()
            record = self._current(client, now)
            return max(0.0, record.locked_until - now) if record else 0.0

    def retry_after_header(self, client: str) -> str:
        return str(max(1, math.ceil(self.retry_after(client))))

    def failure(self, client: str) -> float:
        """Count a wrong password; returns the lockout it starts in seconds (0: none yet)."""
        with self._lock:
            now = self.clock()
            record = self._current(client, now) or _Record()
            record.failures += 1
            record.last_failure = now
            over = record.failures - self.max_failures
            delay = min(self.max_delay, self.first_delay * 2 ** min(over, 32)) if over >= 0 else 0.0
            record.locked_until = now + delay if delay else record.locked_until
            self._records[client] = record
            self._records.move_to_end(client)
            while len(self._records) > self.max_clients:
                self._records.popitem(last=False)
            return delay

    def success(self, client: str) -> None:
        with self._lock:
            self._records.pop(client, None)


def client_address(scope: dict) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"
