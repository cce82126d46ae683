"""A per-key rate limit over a sliding minute."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """At most ``per_minute`` requests per key in any sliding minute (0: no limit). Each key
    keeps the times of its last ``per_minute`` requests, so memory is bounded per key."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.clock = per_minute, clock
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Whether ``key`` may make a request now (and, if so, count it)."""
        if not self.per_minute:
            return True
        now = self.clock()
        with self._lock:
            recent = self._recent.setdefault(key, deque())
            while recent and now - recent[0] >= 60:
                recent.popleft()
            if len(recent) >= self.per_minute:
                return False
            recent.append(now)
            return True
