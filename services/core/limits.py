"""Token buckets, pure: the per-key request rate limit (the clock is passed in)."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """`burst` tokens at most, refilled at `rate_per_s`; a request takes one."""

    rate_per_s: float
    burst: float
    tokens: float
    updated_s: float

    def refill(self, now_s: float) -> None:
        elapsed = max(0.0, now_s - self.updated_s)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
        self.updated_s = now_s

    def wait(self, now_s: float) -> float:
        """The seconds until a token is there (0.0: now), taking none."""
        self.refill(now_s)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate_per_s

    def take(self, now_s: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be."""
        self.refill(now_s)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    """One bucket per key; the least recently used buckets are forgotten past `max_keys` (a
    forgotten bucket comes back full, which only ever errs on the generous side)."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, key: str, now_s: float) -> float:
        """0.0 if the request may go ahead (a token is taken), else the seconds to wait (Retry-After)."""
        if not self.enabled:
            return 0.0
        return self._bucket(key, now_s).take(now_s)

    def wait(self, key: str, now_s: float) -> float:
        """The seconds until `key` would be let through (0.0: now), taking nothing."""
        if not self.enabled or key not in self._buckets:
            return 0.0
        return self._buckets[key].wait(now_s)

    def _bucket(self, key: str, now_s: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate_per_s, self.burst, self.burst, now_s)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket


def retry_after_header(wait_s: float) -> str:
    """Retry-After is whole seconds: round up, so a client that waits that long gets a token."""
    return str(max(1, math.ceil(wait_s)))
