"""Per-session token buckets for provider calls: a burst is allowed, then a steady rate.

A bucket that has refilled completely says nothing a new one would not, so full buckets are
dropped from time to time: memory follows the sessions that recently generated, with no hook
into the session's end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    tokens: float
    updated: float


class SessionRateLimits:
    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = 1024

    def take(self, key: str) -> bool:
        """Spend one token of `key`'s bucket; False (and nothing spent) when it is empty."""
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        allowed = bucket.tokens >= 1.0
        if allowed:
            bucket.tokens -= 1.0
        if len(self._buckets) >= self._prune_at:
            self._prune(now)
        return allowed

    def _prune(self, now: float) -> None:
        self._buckets = {
            key: bucket
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * self.rate < self.burst
        }
        self._prune_at = max(1024, 2 * len(self._buckets))
