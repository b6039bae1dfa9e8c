"""What only the Redis store promises: it survives Redis restarts, lets Redis purge, and fails clearly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from harness.redis_server import RedisServer
from harness.server import ROOT, free_port
from server.store import SessionExpired, SessionState, SessionStore, StoreUnavailable
from server.store.redis_store import DEFAULT_PREFIX, RedisSessionStore

PASSWORD = "not-in-any-message-7f3a"
SIGNAL_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[list[SessionStore]]:
    opened: list[SessionStore] = []
    yield opened
    for store in opened:
        await store.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def open_store(opened: list[SessionStore], url: str, **options: Any) -> RedisSessionStore:
    options = {"resume_window": 3600.0, "key_prefix": f"test:{uuid.uuid4().hex[:8]}:", **options}
    store = RedisSessionStore(url, **options)
    await store.start()
    opened.append(store)
    return store


async def eventually(check: Any, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true within {timeout} s")


# A Redis killed outright keeps every acknowledged write only with `appendfsync always`: with
# `everysec` it may answer before the write reaches its file (see README).
@pytest.mark.parametrize(("kill", "appendfsync"), [(False, "everysec"), (True, "always")], ids=["sigterm", "sigkill"])
async def test_sessions_survive_a_redis_restart(stores: list[SessionStore], kill: bool, appendfsync: str) -> None:
    with RedisServer(appendfsync=appendfsync) as redis_server:
        holder_store = await open_store(stores, redis_server.url)
        other_store = await open_store(stores, redis_server.url, key_prefix=holder_store.key_prefix)
        state = SessionState(str(uuid.uuid4()), 3)
        holder = await holder_store.create(state, "conn-1")
        message = await holder_store.append_message(state.session_id, sender="医生", content="你好", origin="recorded")

        await asyncio.to_thread(redis_server.restart, kill)

        loaded = await other_store.load(state.session_id)
        assert loaded.messages == [message]
        # The holder's signal subscription comes back by itself: a takeover after the restart is heard.
        await other_store.attach(state.session_id, "conn-2")
        await asyncio.wait_for(holder.taken_over.wait(), SIGNAL_TIMEOUT)
        for store in (holder_store, other_store):
            stores.remove(store)
            await store.close()


async def test_redis_purges_an_expired_session_and_keeps_only_its_tombstone(
    stores: list[SessionStore], redis_server: RedisServer, raw: Redis
) -> None:
    store = await open_store(stores, redis_server.url, resume_window=1.0)
    state = SessionState(str(uuid.uuid4()), 3)
    attachment = await store.create(state, "conn-1")
    await store.append_message(state.session_id, sender="医生", content="你好", origin="recorded")
    await store.append_modification(state.session_id, "短一点")
    await store.detach(attachment)
    await store.enqueue_event(state.session_id, {"type": "e", "data": {}})
    keys = [
        f"{store.key_prefix}{{{state.session_id}}}:{part}" for part in ("state", "messages", "outbox", "modifications")
    ]
    assert await raw.exists(*keys) == 4
    assert all(0 < ttl <= 1000 for ttl in [await raw.pttl(key) for key in keys])

    async def data_gone() -> bool:
        return await raw.exists(*keys) == 0

    await eventually(data_gone, timeout=30.0)
    with pytest.raises(SessionExpired):
        await store.load(state.session_id)
    assert await raw.get(f"{store.key_prefix}{{{state.session_id}}}:mark") == "live"


async def test_an_unreachable_redis_is_a_clear_error_without_the_password() -> None:
    port = free_port()
    store = RedisSessionStore(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", resume_window=60.0, timeout=1.0)

    with pytest.raises(StoreUnavailable) as failure:
        await store.start()

    assert f"127.0.0.1:{port}" in str(failure.value)
    assert PASSWORD not in str(failure.value)
    await store.close()


async def test_a_wrong_password_is_a_clear_error_without_the_password(redis_server: RedisServer) -> None:
    store = RedisSessionStore(f"redis://:wrong-{PASSWORD}@127.0.0.1:{redis_server.port}/0", resume_window=60.0)

    with pytest.raises(StoreUnavailable) as failure:
        await store.start()

    assert PASSWORD not in str(failure.value)
    await store.close()


async def test_operations_while_redis_is_down_fail_clearly_and_work_again_after(
    stores: list[SessionStore], redis_server: RedisServer
) -> None:
    store = await open_store(stores, redis_server.url, timeout=1.0)
    state = SessionState(str(uuid.uuid4()), 3)
    await store.create(state, "conn-1")
    failures = {"op": "append_message", "backend": "redis"}
    before = REGISTRY.get_sample_value("adb_session_store_failures_total", failures) or 0.0

    await asyncio.to_thread(redis_server.stop)
    try:
        with pytest.raises(StoreUnavailable) as failure:
            await store.append_message(state.session_id, sender="医生", content="你好", origin="recorded")
        assert PASSWORD not in str(failure.value)
        assert REGISTRY.get_sample_value("adb_session_store_failures_total", failures) == before + 1
    finally:
        await asyncio.to_thread(redis_server.start)

    message = await store.append_message(state.session_id, sender="医生", content="你好", origin="recorded")
    assert message.message_id == "msg_001"


async def test_an_operator_deletes_a_conversation_from_redis(
    stores: list[SessionStore], redis_server: RedisServer, raw: Redis
) -> None:
    store = await open_store(stores, redis_server.url, key_prefix=DEFAULT_PREFIX)
    state = SessionState(str(uuid.uuid4()), 3)
    await store.create(state, "conn-1")
    await store.append_message(state.session_id, sender="医生", content="你好", origin="recorded")

    command = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server.store", "delete", state.session_id],
        cwd=ROOT,
        env={**os.environ, "ENV_FILE": os.devnull, "SESSION_STORE_URL": redis_server.url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert command.returncode == 0, command.stderr
    assert await raw.keys(f"{DEFAULT_PREFIX}{{{state.session_id}}}:*") == [
        f"{DEFAULT_PREFIX}{{{state.session_id}}}:mark"
    ]
    with pytest.raises(SessionExpired):
        await store.load(state.session_id)


async def test_the_delete_command_fails_clearly_when_redis_is_unreachable() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"

    command = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server.store", "delete", str(uuid.uuid4())],
        cwd=ROOT,
        env={**os.environ, "ENV_FILE": os.devnull, "SESSION_STORE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert command.returncode == 2
    assert command.stderr.startswith("error: Redis session store at 127.0.0.1:")
    assert PASSWORD not in command.stderr
