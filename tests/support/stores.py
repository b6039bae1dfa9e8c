"""Open real session stores for the tests: SQLite files in a temporary directory, or a real redis-server.

A `StoreHarness` opens any number of stores on one backend (several stores on one SQLite file or
one Redis stand for several worker processes or instances) and closes them all at the end. Its
`spec` is what `harness.store_writer` needs to open the same store in another process.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

from harness.redis_server import RedisServer
from harness.store_writer import open_store
from server.store import SessionStore

Backend = Literal["sqlite", "redis"]
BACKENDS: tuple[Backend, ...] = ("sqlite", "redis")


class StoreHarness:
    def __init__(self, backend: Backend, state_dir: Path, redis: RedisServer | None) -> None:
        self.backend = backend
        self.state_dir = state_dir
        self.redis = redis
        self.prefix = f"test:{uuid.uuid4().hex[:8]}:"
        self.stores: list[SessionStore] = []

    @property
    def spec(self) -> dict[str, Any]:
        if self.backend == "sqlite":
            return {"backend": "sqlite", "state_dir": str(self.state_dir)}
        assert self.redis is not None
        return {"backend": "redis", "url": self.redis.url, "prefix": self.prefix}

    async def open(self, **options: Any) -> SessionStore:
        store = open_store(self.spec, **options)
        await store.start()
        self.stores.append(store)
        return store

    async def close(self, store: SessionStore) -> None:
        self.stores.remove(store)
        await store.close()

    async def close_all(self) -> None:
        while self.stores:
            await self.close(self.stores[-1])
