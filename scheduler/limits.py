"""Rate limits: a token bucket per key (an API key, a user), refilled at a
steady rate up to a burst.

Pure code: the clock is handed in, and nothing is read or written outside.
Memory stays bounded: a bucket that has refilled to full is the same as no
bucket, so the least recently used ones are dropped once full, and past
`max_keys` the oldest is dropped even if not full (that key gets a fresh
burst, erring towards letting a caller through).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

# Enough keys for every API key of a large cluster at once.
MAX_KEYS = 10_000


class TokenBuckets:
    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float],
        burst_seconds: float = 2.0,
        max_keys: int = MAX_KEYS,
    ) -> None:
        """`rate` tokens a second for each key, up to `burst_seconds` worth
        (at least one); a rate of 0 means no limit."""
        if rate < 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be 0 or more tokens a second, got {rate}")
        self.rate = rate
        self.capacity = max(1.0, rate * burst_seconds)
        self.clock = clock
        self.max_keys = max_keys
        # key -> (tokens, when counted), least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Takes a token from the key's bucket and returns 0, or, when it
        has none, takes nothing and returns the seconds until it will."""
        if self.rate == 0:
            return 0.0
        now = self.clock()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            # Not refused again for being a hair early.
            wait = math.ceil((1.0 - tokens) / self.rate * 1000) / 1000
            self._store(key, tokens, now)
            return wait
        self._store(key, tokens - 1.0, now)
        return 0.0

    def _tokens(self, key: str, now: float) -> float:
        counted = self._buckets.get(key)
        if counted is None:
            return self.capacity
        tokens, at = counted
        # A clock that stepped back refills nothing, and counts from now.
        return min(self.capacity, tokens + max(0.0, now - at) * self.rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._buckets:
            oldest, (tokens, at) = next(iter(self._buckets.items()))
            full = tokens + max(0.0, now - at) * self.rate >= self.capacity
            if not full and len(self._buckets) <= self.max_keys:
                return
            del self._buckets[oldest]
