"""The embedded session store: one SQLite database (WAL) in STATE_DIR, shared by all workers of a machine.

Each worker process opens its own connections. Writes are `BEGIN IMMEDIATE` transactions, so
workers serialise on SQLite's own lock (a busy transaction is retried for up to 5 s), and each is
committed when its awaitable returns. With `fsync=False` (synchronous=NORMAL) a commit survives
the death of any process of the service, SIGKILL included; with `fsync=True` (FULL) it also
survives a power loss or kernel crash, at the price of an fsync per write.

An operation that can finish at once runs on the event loop (a WAL commit without fsync takes
some 30 µs); one that may wait (another worker holds the lock, or fsync is on) runs on one
dedicated thread per process, so the loop never waits on a lock or the disk (bench/bench_store.py
measures both, and the loop's lag). A second thread does the housekeeping that must not sit on the
write path: WAL checkpoints (automatic checkpoints are off for the writing connection), the
purge of expired sessions, and the polling that tells this process's attachments they were taken
over by another process (attachments in the same process are told at once).

Deleted content is overwritten (`secure_delete`) and the WAL is truncated after deletions, so a
purged conversation does not linger in the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from server.store.errors import SessionExpired, SessionNotFound, SessionTakenOver, StoreUnavailable
from server.store.interface import DEFAULT_OUTBOX_LIMIT, SessionStore, check_updatable, timed
from server.store.metrics import SESSIONS_EXPIRED
from server.store.model import Attachment, Event, Origin, SessionState, StoredMessage, message_id_for

log = logging.getLogger("server.store")

T = TypeVar("T")
DATABASE_NAME = "sessions.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 5.0
# A transaction holds the write lock for about a tenth of a millisecond. SQLite's own busy handler
# sleeps 1, 2, 5, 10... ms between tries, which would put those sleeps into the p99 of every write
# that meets another worker's: the store's thread retries sooner itself.
FIRST_BUSY_PAUSE = 0.00005
LONGEST_BUSY_PAUSE = 0.0005
# A checkpoint fsyncs the WAL and the database, which slows the writes that meet it: not too often.
CHECKPOINT_INTERVAL = 10.0

SCHEMA = (
    # `fields`: the session's JSON (SessionState.fields_dict without last_activity); the columns
    # beside it are what the store itself reads and changes.
    """CREATE TABLE IF NOT EXISTS sessions (
        session_id TEXT PRIMARY KEY,
        fields TEXT NOT NULL,
        message_count INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        holder TEXT,
        last_activity REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions (last_activity)",
    """CREATE TABLE IF NOT EXISTS messages (
        session_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        sender TEXT NOT NULL,
        content TEXT NOT NULL,
        origin TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (session_id, position)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS messages_by_id ON messages (session_id, message_id)",
    """CREATE TABLE IF NOT EXISTS outbox (
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        event TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS tombstones (
        session_id TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        since REAL NOT NULL
    ) WITHOUT ROWID""",
)

Row = tuple[Any, ...]


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` ... `COMMIT`: takes the write lock up front, so two workers never deadlock."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def is_busy(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def retry_busy(work: Callable[..., T], *args: Any) -> T:
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    pause = FIRST_BUSY_PAUSE
    while True:
        try:
            return work(*args)
        except sqlite3.OperationalError as error:
            if not is_busy(error) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, LONGEST_BUSY_PAUSE)


@contextlib.contextmanager
def read_snapshot(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN")
    try:
        yield db
    finally:
        db.execute("COMMIT")


class SqliteSessionStore(SessionStore):
    backend = "sqlite"

    def __init__(
        self,
        state_dir: Path,
        *,
        resume_window: float,
        tombstone_ttl: float | None = None,
        outbox_limit: int = DEFAULT_OUTBOX_LIMIT,
        fsync: bool = False,
        poll_interval: float = 0.2,
        purge_interval: float = 10.0,
    ) -> None:
        super().__init__(resume_window=resume_window, tombstone_ttl=tombstone_ttl, outbox_limit=outbox_limit)
        self.path = state_dir / DATABASE_NAME
        self.fsync = fsync
        self.poll_interval = poll_interval
        self.purge_interval = purge_interval
        self._io = ThreadPoolExecutor(1, thread_name_prefix="session-store")
        self._on_thread = 0
        self._housekeeping = ThreadPoolExecutor(1, thread_name_prefix="session-store-housekeeping")
        self._db: sqlite3.Connection | None = None
        self._housekeeping_db: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._deleted = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._prepare_files()
        except OSError as error:
            raise StoreUnavailable(f"SQLite session store {self.path}: {error.strerror}") from error
        self._db = await self._call(self._connect, False)
        await self._call(self._create_schema)
        self._housekeeping_db = await self._run(self._housekeeping, self._connect, True)
        self._task = asyncio.create_task(self._housekeep(), name="session-store-housekeeping")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        loop = asyncio.get_running_loop()
        if self._db is not None:
            await loop.run_in_executor(self._io, self._db.close)
            self._db = None
        if self._housekeeping_db is not None:
            await loop.run_in_executor(self._housekeeping, self._housekeeping_db.close)
            self._housekeeping_db = None
        self._io.shutdown(wait=False)
        self._housekeeping.shutdown(wait=False)

    def _prepare_files(self) -> None:
        # Private conversations: the directory is the service's alone, the files (the WAL and shm
        # files take the database's mode) are readable by the service user only.
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", 0o600)

    def _connect(self, housekeeping: bool) -> sqlite3.Connection:
        timeout = BUSY_TIMEOUT_SECONDS if housekeeping else 0.0
        # Used by the loop and by the store's thread, never by both at once (see `_call`).
        db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            db.execute("PRAGMA secure_delete=ON")
            if not housekeeping:
                # Checkpoints copy the WAL into the database and fsync it: the housekeeping thread does that.
                db.execute("PRAGMA wal_autocheckpoint=0")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _create_schema(self) -> None:
        db = self._conn()
        with write_transaction(db):
            for statement in SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable("SQLite session store is not open")
        return self._db

    async def _run(self, executor: ThreadPoolExecutor, work: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, work, *args)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"SQLite session store {self.path}: {error}") from error

    async def _call(self, work: Callable[..., T], *args: Any) -> T:
        """Run one operation (a whole transaction): on the loop if it can finish at once, else on the store's thread.

        Without fsync a transaction takes some 30 µs, less than the loop spends handing it to a thread
        and back, and it spares the two thread switches that a busy machine makes cost milliseconds.
        What may wait goes to the thread: a lock held by another worker, an fsync, or anything queued
        there already (so operations stay in order).
        """
        if not self.fsync and self._on_thread == 0:
            try:
                return work(*args)
            except sqlite3.Error as error:
                if not is_busy(error):
                    raise StoreUnavailable(f"SQLite session store {self.path}: {error}") from error
        self._on_thread += 1
        try:
            return await self._run(self._io, retry_busy, work, *args)
        finally:
            self._on_thread -= 1

    # -- rows -------------------------------------------------------------------------------------

    def _live(self, db: sqlite3.Connection, session_id: str, now: float) -> Row:
        """(fields, message_count, epoch, holder, last_activity) of a session that may still be resumed, or raise."""
        row: Row | None = db.execute(
            "SELECT fields, message_count, epoch, holder, last_activity FROM sessions WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            tombstone = db.execute("SELECT reason FROM tombstones WHERE session_id = ?", (session_id,)).fetchone()
            if tombstone is not None:
                raise SessionExpired(session_id, tombstone[0])
            raise SessionNotFound(session_id)
        if row[4] + self.resume_window <= now:
            raise SessionExpired(session_id, "expired")
        return row

    def _touch(self, db: sqlite3.Connection, session_id: str, now: float) -> None:
        db.execute("UPDATE sessions SET last_activity = ? WHERE session_id = ?", (now, session_id))

    # -- sessions ---------------------------------------------------------------------------------

    @timed("create")
    async def create(self, state: SessionState, token: str) -> Attachment:
        await self._call(self._create, state, token, time.time())
        return self._hold(Attachment(state.session_id, token, 1))

    def _create(self, state: SessionState, token: str, now: float) -> None:
        db = self._conn()
        fields = state.fields_dict()
        del fields["last_activity"]
        with write_transaction(db):
            exists = db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (state.session_id,)).fetchone()
            if exists:
                raise ValueError(f"session {state.session_id} already exists")
            db.execute(
                "INSERT INTO sessions (session_id, fields, message_count, epoch, holder, last_activity)"
                " VALUES (?, ?, ?, 1, ?, ?)",
                (state.session_id, orjson.dumps(fields), len(state.messages), token, now),
            )
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (state.session_id, position, m.message_id, m.sender, m.content, m.origin, m.created_at)
                    for position, m in enumerate(state.messages, start=1)
                ],
            )

    @timed("load")
    async def load(self, session_id: str) -> SessionState:
        return await self._call(self._load, session_id, time.time())

    def _load(self, session_id: str, now: float) -> SessionState:
        db = self._conn()
        with read_snapshot(db):
            fields_json, _, _, _, last_activity = self._live(db, session_id, now)
            rows = db.execute(
                "SELECT message_id, sender, content, origin, created_at FROM messages"
                " WHERE session_id = ? ORDER BY position",
                (session_id,),
            ).fetchall()
        data = orjson.loads(fields_json)
        data["last_activity"] = last_activity
        data["messages"] = [
            {"message_id": r[0], "sender": r[1], "content": r[2], "origin": r[3], "created_at": r[4]} for r in rows
        ]
        return SessionState.from_dict(data)

    async def _session_write(self, work: Callable[..., tuple[T, int, str | None]], session_id: str, *args: Any) -> T:
        held = list(self._held.get(session_id, []))
        result, epoch, holder = await self._call(work, session_id, *args, time.time())
        # Every write reads who holds the session: holders in this process learn of a takeover for free.
        self._observe(held, epoch, holder, False)
        return result

    @timed("append_message")
    async def append_message(self, session_id: str, *, sender: str, content: str, origin: Origin) -> StoredMessage:
        return await self._session_write(self._append_message, session_id, sender, content, origin)

    def _append_message(
        self, session_id: str, sender: str, content: str, origin: Origin, now: float
    ) -> tuple[StoredMessage, int, str | None]:
        db = self._conn()
        with write_transaction(db):
            _, count, epoch, holder, _ = self._live(db, session_id, now)
            position = count + 1
            message_id = self._free_id(db, session_id, origin, position)
            message = StoredMessage(message_id, sender, content, origin, now)
            db.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session_id, position, message.message_id, sender, content, origin, now),
            )
            db.execute(
                "UPDATE sessions SET message_count = ?, last_activity = ? WHERE session_id = ?",
                (position, now, session_id),
            )
        return message, epoch, holder

    def _free_id(self, db: sqlite3.Connection, session_id: str, origin: Origin, position: int) -> str:
        """The id for `position`, or the next free number when a history message already holds it."""
        number = position
        while db.execute(
            "SELECT 1 FROM messages WHERE session_id = ? AND message_id = ?",
            (session_id, message_id_for(origin, number)),
        ).fetchone():
            number += 1
        return message_id_for(origin, number)

    @timed("append_modification")
    async def append_modification(self, session_id: str, modification: str) -> None:
        def add(fields: dict[str, Any]) -> None:
            fields["modifications"].append(modification)

        await self._session_write(self._change_fields, session_id, add)

    @timed("update_fields")
    async def update_fields(self, session_id: str, /, **changes: Any) -> None:
        check_updatable(changes)
        await self._session_write(self._change_fields, session_id, lambda fields: fields.update(changes))

    def _change_fields(
        self, session_id: str, change: Callable[[dict[str, Any]], None], now: float
    ) -> tuple[None, int, str | None]:
        db = self._conn()
        with write_transaction(db):
            fields_json, _, epoch, holder, _ = self._live(db, session_id, now)
            fields = orjson.loads(fields_json)
            change(fields)
            db.execute(
                "UPDATE sessions SET fields = ?, last_activity = ? WHERE session_id = ?",
                (orjson.dumps(fields), now, session_id),
            )
        return None, epoch, holder

    @timed("touch")
    async def touch(self, session_id: str) -> None:
        await self._session_write(self._touch_live, session_id)

    def _touch_live(self, session_id: str, now: float) -> tuple[None, int, str | None]:
        db = self._conn()
        with write_transaction(db):
            _, _, epoch, holder, _ = self._live(db, session_id, now)
            self._touch(db, session_id, now)
        return None, epoch, holder

    @timed("delete")
    async def delete(self, session_id: str) -> None:
        await self._call(self._delete, session_id, time.time())
        self._deleted = True
        self._observe(self._held.get(session_id, []), None, None, False)

    def _delete(self, session_id: str, now: float) -> None:
        db = self._conn()
        with write_transaction(db):
            if db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount:
                db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
                db.execute("DELETE FROM outbox WHERE session_id = ?", (session_id,))
                db.execute("INSERT OR REPLACE INTO tombstones VALUES (?, 'ended', ?)", (session_id, now))

    # -- attachment -----------------------------------------------------------------------------

    @timed("attach")
    async def attach(self, session_id: str, token: str) -> Attachment:
        epoch = await self._call(self._attach, session_id, token, time.time())
        self._observe(self._held.get(session_id, []), epoch, token, False)
        return self._hold(Attachment(session_id, token, epoch))

    def _attach(self, session_id: str, token: str, now: float) -> int:
        db = self._conn()
        with write_transaction(db):
            epoch = int(self._live(db, session_id, now)[2]) + 1
            db.execute(
                "UPDATE sessions SET epoch = ?, holder = ?, last_activity = ? WHERE session_id = ?",
                (epoch, token, now, session_id),
            )
        return epoch

    @timed("is_attached")
    async def is_attached(self, attachment: Attachment) -> bool:
        row = await self._call(self._holder, attachment.session_id)
        epoch, holder = row if row is not None else (None, None)
        self._observe([attachment], epoch, holder, False)
        return not attachment.taken_over.is_set()

    def _holder(self, session_id: str) -> tuple[int, str | None] | None:
        row: tuple[int, str | None] | None = (
            self._conn().execute("SELECT epoch, holder FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        )
        return row

    @timed("detach")
    async def detach(self, attachment: Attachment) -> bool:
        self._release(attachment)
        return await self._call(self._detach, attachment.session_id, attachment.epoch, attachment.token, time.time())

    def _detach(self, session_id: str, epoch: int, token: str, now: float) -> bool:
        db = self._conn()
        with write_transaction(db):
            released = db.execute(
                "UPDATE sessions SET holder = NULL, last_activity = ?"
                " WHERE session_id = ? AND epoch = ? AND holder = ?",
                (now, session_id, epoch, token),
            ).rowcount
        return bool(released)

    # -- events for a detached client -------------------------------------------------------------

    @timed("deliver")
    async def deliver(self, attachment: Attachment, event: Event) -> bool:
        # The usual case, the holder sending its own event, costs one read; only a queued event writes.
        row = await self._call(self._holder, attachment.session_id)
        if row is not None and tuple(row) == (attachment.epoch, attachment.token):
            return True
        return not await self._enqueue_signalled(attachment.session_id, event, attachment)

    @timed("enqueue_event")
    async def enqueue_event(self, session_id: str, event: Event) -> None:
        await self._enqueue_signalled(session_id, event, None)

    async def _enqueue_signalled(self, session_id: str, event: Event, sender: Attachment | None) -> bool:
        held = list(self._held.get(session_id, []))
        queued, epoch, holder = await self._call(self._enqueue, session_id, orjson.dumps(event), sender, time.time())
        if queued:
            # A holder in this process hears at once; one in another process at its next poll.
            self._observe(held, epoch, holder, True)
        return queued

    def _enqueue(
        self, session_id: str, event: bytes, sender: Attachment | None, now: float
    ) -> tuple[bool, int, str | None]:
        """Queue `event` unless `sender` holds the session; say whether it was queued, and who holds the session."""
        db = self._conn()
        with write_transaction(db):
            _, _, epoch, holder, _ = self._live(db, session_id, now)
            if sender is not None and (epoch, holder) == (sender.epoch, sender.token):
                return False, epoch, holder
            (last,) = db.execute(
                "SELECT coalesce(max(seq), 0) FROM outbox WHERE session_id = ?", (session_id,)
            ).fetchone()
            db.execute("INSERT INTO outbox VALUES (?, ?, ?)", (session_id, last + 1, event))
            db.execute(
                "DELETE FROM outbox WHERE session_id = ? AND seq <= ?", (session_id, last + 1 - self.outbox_limit)
            )
        return True, epoch, holder

    @timed("drain_events")
    async def drain_events(self, attachment: Attachment) -> list[Event]:
        attachment.events_waiting.clear()
        events = await self._call(self._drain, attachment, time.time())
        return [orjson.loads(event) for event in events]

    def _drain(self, attachment: Attachment, now: float) -> list[bytes]:
        db = self._conn()
        with write_transaction(db):
            _, _, epoch, holder, _ = self._live(db, attachment.session_id, now)
            if (epoch, holder) != (attachment.epoch, attachment.token):
                raise SessionTakenOver(attachment.session_id, attachment.epoch)
            rows = db.execute(
                "DELETE FROM outbox WHERE session_id = ? RETURNING seq, event", (attachment.session_id,)
            ).fetchall()
        return [event for _, event in sorted(rows)]

    # -- housekeeping -----------------------------------------------------------------------------

    async def purge_expired(self) -> int:
        """Delete sessions past their resume window (leaving tombstones) and old tombstones; count the sessions."""
        purged = await self._run(self._housekeeping, self._purge, time.time())
        if purged or self._deleted:
            self._deleted = False
            await self._run(self._housekeeping, self._checkpoint, "TRUNCATE")
        return purged

    def _purge(self, now: float) -> int:
        db = self._housekeeping_conn()
        with write_transaction(db):
            expired = [
                row[0]
                for row in db.execute(
                    "SELECT session_id FROM sessions WHERE last_activity <= ?", (now - self.resume_window,)
                )
            ]
            ids = orjson.dumps(expired)
            for table in ("messages", "outbox", "sessions"):
                db.execute(f"DELETE FROM {table} WHERE session_id IN (SELECT value FROM json_each(?))", (ids,))
            db.execute("INSERT OR REPLACE INTO tombstones SELECT value, 'expired', ? FROM json_each(?)", (now, ids))
            db.execute("DELETE FROM tombstones WHERE since <= ?", (now - self.tombstone_ttl,))
        if expired:
            SESSIONS_EXPIRED.inc(len(expired))
            log.info("sessions expired", extra={"count": len(expired)})
        return len(expired)

    def _checkpoint(self, mode: str) -> None:
        self._housekeeping_conn().execute(f"PRAGMA wal_checkpoint({mode})").fetchone()

    def _housekeeping_conn(self) -> sqlite3.Connection:
        if self._housekeeping_db is None:
            raise StoreUnavailable("SQLite session store is not open")
        return self._housekeeping_db

    def _poll(self, session_ids: list[str], seen_version: int) -> tuple[int, list[Row] | None]:
        """Epoch, holder and queued events of the sessions held here; None if nothing was committed since last time."""
        db = self._housekeeping_conn()
        (version,) = db.execute("PRAGMA data_version").fetchone()
        if version == seen_version or not session_ids:
            return version, None
        rows = db.execute(
            "SELECT s.session_id, s.epoch, s.holder, EXISTS (SELECT 1 FROM outbox o WHERE o.session_id = s.session_id)"
            " FROM sessions s WHERE s.session_id IN (SELECT value FROM json_each(?))",
            (orjson.dumps(session_ids),),
        ).fetchall()
        return version, rows

    async def _housekeep(self) -> None:
        version = -1
        polled: set[str] = set()
        next_purge = next_checkpoint = time.monotonic()
        while True:
            try:
                held = self._held_now()
                # A session held since the last poll is asked about even if nothing was committed since:
                # what was committed before it was held has not been looked at for it.
                seen = version if polled.issuperset(held) else -1
                version, rows = await self._run(self._housekeeping, self._poll, list(held), seen)
                polled = set(held)
                found = {row[0]: row for row in rows or ()}
                if rows is not None:
                    for session_id, attachments in held.items():
                        row = found.get(session_id)
                        if row is None:
                            self._observe(attachments, None, None, False)
                        else:
                            self._observe(attachments, row[1], row[2], bool(row[3]))
                now = time.monotonic()
                if now >= next_purge:
                    next_purge = now + self.purge_interval
                    await self.purge_expired()
                elif now >= next_checkpoint:
                    next_checkpoint = now + CHECKPOINT_INTERVAL
                    await self._run(self._housekeeping, self._checkpoint, "PASSIVE")
            except StoreUnavailable as error:
                log.warning("session store housekeeping failed", extra={"error": str(error)})
            await asyncio.sleep(self.poll_interval)
