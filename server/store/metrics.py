"""Store metrics, in the same prometheus_client registry (and multiprocess files) as server/metrics.py."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# A durable write should cost well under a millisecond; the slow tail (fsync, a busy lock, a
# remote Redis) is what these buckets are for.
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

STORE_LATENCY = Histogram(
    "adb_session_store_operation_seconds",
    "Session store operation latency, by operation and backend",
    ["op", "backend"],
    buckets=STORE_BUCKETS,
)
STORE_FAILURES = Counter(
    "adb_session_store_failures",
    "Session store operations that failed because the backend was unavailable, by operation and backend",
    ["op", "backend"],
)
# Redis expires sessions by key TTL, unseen by the service: there, `adb_session_resumes{outcome="expired"}`
# counts the expiries someone noticed.
SESSIONS_EXPIRED = Counter(
    "adb_sessions_expired", "Sessions purged by the SQLite store after SESSION_RESUME_WINDOW without activity"
)
