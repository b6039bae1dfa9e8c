"""`python -m harness.store_writer '<json>'`: one writer process for the store tests and benchmark.

It opens the store described by the JSON (an `open_store` spec, plus
`session_id`, `count`, `writer`, `start_at`, a wall-clock time at which all writers begin, and
optionally `interval`, seconds between writes), appends `count` messages to the session, and
prints each message id as soon as the store confirmed it, so a parent that kills it knows
exactly what was confirmed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from server.store import SessionStore
from server.store.redis_store import RedisSessionStore
from server.store.sqlite_store import SqliteSessionStore

# Short intervals so that cross-process signals and purges happen within a test's patience.
POLL_INTERVAL = 0.05
PURGE_INTERVAL = 0.25


def open_store(spec: dict[str, Any], **options: Any) -> SessionStore:
    """A store (not started) as `spec` describes it: {"backend": "sqlite", "state_dir": ...} or
    {"backend": "redis", "url": ..., "prefix": ...}; `options` go to its constructor."""
    options.setdefault("resume_window", 3600.0)
    if spec["backend"] == "sqlite":
        options.setdefault("poll_interval", POLL_INTERVAL)
        options.setdefault("purge_interval", PURGE_INTERVAL)
        return SqliteSessionStore(Path(spec["state_dir"]), **options)
    return RedisSessionStore(spec["url"], key_prefix=spec["prefix"], **options)


async def write(spec: dict[str, Any]) -> None:
    store = open_store(spec)
    await store.start()
    try:
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        for index in range(spec["count"]):
            message = await store.append_message(
                spec["session_id"],
                sender=f"writer-{spec['writer']}",
                content=f"{spec['writer']}:{index}",
                origin="recorded",
            )
            print(message.message_id, flush=True)
            await asyncio.sleep(spec.get("interval", 0))
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(write(orjson.loads(sys.argv[1])))
