"""`python -m tests.support.store_writer '<json>'`: one writer process for the store tests.

It opens the store described by the JSON (`tests.support.stores.open_store` spec, plus
`session_id`, `count`, `writer`, `start_at`, a wall-clock time at which all writers begin, and
optionally `interval`, seconds between writes), appends `count` messages to the session, and
prints each message id as soon as the store confirmed it, so a parent that kills it knows
exactly what was confirmed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson

from tests.support.stores import open_store


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
