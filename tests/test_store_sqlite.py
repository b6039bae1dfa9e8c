"""What only the SQLite store promises: private files, and purged conversations gone from the disk."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from harness.server import ROOT
from harness.store_writer import PURGE_INTERVAL
from server.store import SessionExpired, SessionState, StoreUnavailable
from server.store.sqlite_store import DATABASE_NAME, SqliteSessionStore

PURGE_DEADLINE = 30.0


@pytest.fixture
async def stores() -> AsyncIterator[list[SqliteSessionStore]]:
    opened: list[SqliteSessionStore] = []
    yield opened
    for store in opened:
        await store.close()


async def open_store(opened: list[SqliteSessionStore], state_dir: Path, **options: float) -> SqliteSessionStore:
    store = SqliteSessionStore(state_dir, purge_interval=PURGE_INTERVAL, **{"resume_window": 3600.0, **options})
    await store.start()
    opened.append(store)
    return store


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_contain(state_dir: Path, needle: str) -> bool:
    data = needle.encode()
    return any(data in path.read_bytes() for path in state_dir.iterdir() if path.is_file())


async def eventually_absent(state_dir: Path, needle: str) -> float:
    """Seconds until no file of the store contains `needle` (fails after PURGE_DEADLINE)."""
    started = time.monotonic()
    while files_contain(state_dir, needle):
        assert time.monotonic() - started < PURGE_DEADLINE, f"{needle!r} still on disk"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_the_database_files_are_private(stores: list[SqliteSessionStore], tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    store = await open_store(stores, state_dir)
    await store.create(SessionState(str(uuid.uuid4()), 3), "conn-1")

    assert mode(state_dir) == 0o700
    names = {path.name for path in state_dir.iterdir()}
    assert {DATABASE_NAME, f"{DATABASE_NAME}-wal", f"{DATABASE_NAME}-shm"} <= names
    assert all(mode(path) == 0o600 for path in state_dir.iterdir())


async def test_a_database_left_readable_by_others_is_made_private(
    stores: list[SqliteSessionStore], tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / DATABASE_NAME).touch(mode=0o644)

    await open_store(stores, state_dir)

    assert mode(state_dir / DATABASE_NAME) == 0o600


async def test_an_unusable_state_dir_is_reported_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = SqliteSessionStore(blocker / "state", resume_window=60.0)

    with pytest.raises(StoreUnavailable, match="not-a-directory"):
        await store.start()


async def test_an_expired_conversation_is_wiped_from_the_files(
    stores: list[SqliteSessionStore], tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    store = await open_store(stores, state_dir, resume_window=1.0)
    state = SessionState(str(uuid.uuid4()), 3)
    secret = f"private-{uuid.uuid4().hex}"
    attachment = await store.create(state, "conn-1")
    await store.append_message(state.session_id, sender="医生", content=secret, origin="recorded")
    await store.detach(attachment)
    assert files_contain(state_dir, secret)

    await eventually_absent(state_dir, secret)


async def test_an_ended_conversation_is_wiped_from_the_files(stores: list[SqliteSessionStore], tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    store = await open_store(stores, state_dir)
    state = SessionState(str(uuid.uuid4()), 3)
    secret = f"private-{uuid.uuid4().hex}"
    await store.create(state, "conn-1")
    await store.append_message(state.session_id, sender="医生", content=secret, origin="recorded")
    assert files_contain(state_dir, secret)

    await store.delete(state.session_id)

    await eventually_absent(state_dir, secret)


async def test_an_operator_deletes_a_conversation_while_the_service_runs(
    stores: list[SqliteSessionStore], tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    store = await open_store(stores, state_dir)
    state = SessionState(str(uuid.uuid4()), 3)
    secret = f"private-{uuid.uuid4().hex}"
    holder = await store.create(state, "conn-1")
    await store.append_message(state.session_id, sender="医生", content=secret, origin="recorded")

    command = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server.store", "delete", state.session_id],
        cwd=ROOT,
        env={**os.environ, "ENV_FILE": os.devnull, "STATE_DIR": str(state_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert command.returncode == 0, command.stderr
    assert not files_contain(state_dir, secret)
    with pytest.raises(SessionExpired):
        await store.load(state.session_id)
    assert not await store.is_attached(holder)


async def test_a_write_that_meets_another_workers_lock_waits_for_it_and_lands(
    stores: list[SqliteSessionStore], tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    store = await open_store(stores, state_dir)
    state = SessionState(str(uuid.uuid4()), 3)
    await store.create(state, "conn-1")
    other_worker = sqlite3.connect(state_dir / DATABASE_NAME, isolation_level=None)
    other_worker.execute("BEGIN IMMEDIATE")
    try:
        write = asyncio.create_task(
            store.append_message(state.session_id, sender="医生", content="等一下", origin="recorded")
        )
        await asyncio.sleep(0.2)
        assert not write.done()
    finally:
        other_worker.execute("COMMIT")
        other_worker.close()

    message = await write
    assert (await store.load(state.session_id)).messages == [message]
