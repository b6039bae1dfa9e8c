"""The per-session token buckets that bound provider calls."""

from __future__ import annotations

import time

from server.rate_limits import SessionRateLimits


def test_a_session_gets_its_burst_then_is_refused_while_others_are_not() -> None:
    limits = SessionRateLimits(per_minute=1, burst=3)
    assert [limits.take("a") for _ in range(5)] == [True, True, True, False, False]
    assert limits.take("b")


def test_tokens_come_back_at_the_rate() -> None:
    limits = SessionRateLimits(per_minute=600, burst=1)  # one token every 0.1 s
    assert limits.take("a") and not limits.take("a")
    time.sleep(0.15)
    assert limits.take("a")


def test_only_full_buckets_are_forgotten() -> None:
    limits = SessionRateLimits(per_minute=1, burst=2)
    for number in range(1100):
        assert limits.take(f"idle-{number}")
    # Every bucket still lacks a token (one comes back a minute), so none was forgotten or reset.
    assert len(limits._buckets) == 1100
    assert limits.take("idle-0") and not limits.take("idle-0")
    refilled = SessionRateLimits(per_minute=60_000, burst=1)  # a token every millisecond
    for number in range(1000):
        refilled.take(f"idle-{number}")
    time.sleep(0.05)
    for number in range(100):
        refilled.take(f"busy-{number}")
    assert not any(key.startswith("idle-") for key in refilled._buckets), "refilled buckets are forgotten"
