"""The session store contract, run against both real backends: SQLite files and a real redis-server.

Several stores on one SQLite file or one Redis stand for several Sanic workers or instances.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY

from harness.redis_server import RedisServer
from harness.server import ROOT
from server.store import (
    SessionExpired,
    SessionNotFound,
    SessionState,
    SessionTakenOver,
    StoredMessage,
)
from tests.support.stores import BACKENDS, Backend, StoreHarness

SIGNAL_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=BACKENDS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreHarness]:
    backend: Backend = request.param
    redis = request.getfixturevalue("redis_server") if backend == "redis" else None
    stores = StoreHarness(backend, tmp_path / "state", redis)
    yield stores
    await stores.close_all()


def new_state(**fields: object) -> SessionState:
    state = SessionState(
        session_id=str(uuid.uuid4()),
        response_count=3,
        scenario_description="在社区医院复诊",
        messages=[
            StoredMessage("h1", "医生", "最近睡得怎么样？", "history"),
            StoredMessage("h2", "我", "", "history"),
        ],
        options={"partial_transcripts": True},
        user_profile={"name": "小李", "age": 30, "taboos": []},
        target_profile=None,
    )
    for name, value in fields.items():
        setattr(state, name, value)
    return state


async def wait_set(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), SIGNAL_TIMEOUT)


def latency_count(op: str, backend: str) -> float:
    value = REGISTRY.get_sample_value("adb_session_store_operation_seconds_count", {"op": op, "backend": backend})
    return value or 0.0


async def test_a_session_round_trips_with_every_field(harness: StoreHarness) -> None:
    store = await harness.open()
    state = new_state()
    await store.create(state, "conn-1")

    loaded = await store.load(state.session_id)

    assert loaded.to_dict() | {"last_activity": 0} == state.to_dict() | {"last_activity": 0}
    assert loaded.last_activity >= state.created_at


async def test_writes_are_visible_to_every_other_store(harness: StoreHarness) -> None:
    writer, reader = await harness.open(), await harness.open()
    state = new_state()
    await writer.create(state, "conn-1")

    recorded = await writer.append_message(
        state.session_id, sender="医生", content="那药要不要换一下？", origin="recorded"
    )
    selected = await writer.append_message(state.session_id, sender="我", content="不想换", origin="selected")
    await writer.append_modification(state.session_id, "语气再委婉一点")
    await writer.append_modification(state.session_id, "提一下副作用")
    await writer.update_fields(
        state.session_id,
        response_count=5,
        scenario_supplement="医生比较忙",
        last_focus=["msg_003"],
        last_opinion="不换",
    )

    loaded = await reader.load(state.session_id)
    assert (recorded.message_id, selected.message_id) == ("msg_003", "usr_004")
    assert [m.message_id for m in loaded.messages] == ["h1", "h2", "msg_003", "usr_004"]
    assert loaded.messages[2] == recorded
    assert loaded.messages[3].origin == "selected"
    assert loaded.modifications == ["语气再委婉一点", "提一下副作用"]
    assert (loaded.response_count, loaded.scenario_supplement) == (5, "医生比较忙")
    assert (loaded.last_focus, loaded.last_opinion) == (["msg_003"], "不换")
    assert loaded.scenario_description == "在社区医院复诊"


async def test_a_new_message_id_never_repeats_a_history_message_id(harness: StoreHarness) -> None:
    store = await harness.open()
    # Clients choose history ids freely, even twice.
    history = [StoredMessage("msg_003", "医生", "你好", "history"), StoredMessage("msg_003", "我", "嗯", "history")]
    state = new_state(messages=history)
    await store.create(state, "conn-1")

    recorded = await store.append_message(state.session_id, sender="医生", content="a", origin="recorded")
    selected = await store.append_message(state.session_id, sender="我", content="b", origin="selected")

    assert (recorded.message_id, selected.message_id) == ("msg_004", "usr_004")
    ids = [m.message_id for m in (await store.load(state.session_id)).messages]
    assert ids == ["msg_003", "msg_003", "msg_004", "usr_004"]


async def test_update_fields_refuses_fields_it_does_not_own(harness: StoreHarness) -> None:
    store = await harness.open()
    state = new_state()
    await store.create(state, "conn-1")

    with pytest.raises(ValueError, match="messages"):
        await store.update_fields(state.session_id, messages=[])
    assert len((await store.load(state.session_id)).messages) == 2


async def test_unknown_session_is_not_found_everywhere(harness: StoreHarness) -> None:
    store = await harness.open()
    unknown = str(uuid.uuid4())

    with pytest.raises(SessionNotFound):
        await store.load(unknown)
    with pytest.raises(SessionNotFound):
        await store.attach(unknown, "conn-1")
    with pytest.raises(SessionNotFound):
        await store.append_message(unknown, sender="a", content="b", origin="recorded")
    with pytest.raises(SessionNotFound):
        await store.enqueue_event(unknown, {"type": "status_update", "data": {}})


async def test_events_queued_while_detached_come_back_in_order_once(harness: StoreHarness) -> None:
    first, second = await harness.open(), await harness.open()
    state = new_state()
    attachment = await first.create(state, "conn-1")
    assert await first.detach(attachment)
    events = [
        {"type": "message_recorded", "data": {"session_id": state.session_id, "n": n, "text": "你好"}} for n in range(5)
    ]

    for event in events:
        await first.enqueue_event(state.session_id, event)
    resumed = await second.attach(state.session_id, "conn-2")

    assert await second.drain_events(resumed) == events
    assert await second.drain_events(resumed) == []


async def test_the_outbox_keeps_only_the_newest_events(harness: StoreHarness) -> None:
    store = await harness.open(outbox_limit=3)
    state = new_state()
    attachment = await store.create(state, "conn-1")
    await store.detach(attachment)

    for n in range(5):
        await store.enqueue_event(state.session_id, {"type": "e", "data": {"n": n}})
    resumed = await store.attach(state.session_id, "conn-2")

    assert [event["data"]["n"] for event in await store.drain_events(resumed)] == [2, 3, 4]


async def test_a_second_attach_takes_over_and_the_first_holder_hears_it(harness: StoreHarness) -> None:
    worker_a, worker_b = await harness.open(), await harness.open()
    state = new_state()
    old = await worker_a.create(state, "conn-1")

    new = await worker_b.attach(state.session_id, "conn-2")

    assert new.epoch > old.epoch
    await wait_set(old.taken_over)
    assert not await worker_a.is_attached(old)
    assert await worker_b.is_attached(new)
    assert not new.taken_over.is_set()
    with pytest.raises(SessionTakenOver):
        await worker_a.drain_events(old)
    assert not await worker_a.detach(old)
    assert await worker_b.is_attached(new)


async def test_a_write_by_a_holder_that_was_taken_over_lands_and_tells_it(harness: StoreHarness) -> None:
    # SQLite's polling is made too slow to matter: the write itself must tell.
    slow = {"poll_interval": 3600.0} if harness.backend == "sqlite" else {}
    worker_a, worker_b = await harness.open(**slow), await harness.open()
    state = new_state()
    old = await worker_a.create(state, "conn-1")
    await worker_b.attach(state.session_id, "conn-2")

    message = await worker_a.append_message(state.session_id, sender="医生", content="录完了", origin="recorded")

    assert old.taken_over.is_set()
    assert (await worker_b.load(state.session_id)).messages[-1] == message


async def test_a_takeover_in_the_same_process_is_heard_at_once(harness: StoreHarness) -> None:
    store = await harness.open()
    state = new_state()
    old = await store.create(state, "conn-1")

    await store.attach(state.session_id, "conn-2")

    assert old.taken_over.is_set()


async def test_the_old_holder_cannot_send_and_its_event_reaches_the_new_holder(harness: StoreHarness) -> None:
    worker_a, worker_b = await harness.open(), await harness.open()
    state = new_state()
    old = await worker_a.create(state, "conn-1")
    event = {"type": "message_recorded", "data": {"session_id": state.session_id, "message_id": "msg_003"}}
    assert await worker_a.deliver(old, {"type": "status_update", "data": {}})

    new = await worker_b.attach(state.session_id, "conn-2")
    delivered = await worker_a.deliver(old, event)

    assert not delivered
    await wait_set(new.events_waiting)
    assert await worker_b.drain_events(new) == [event]
    assert not new.events_waiting.is_set()


async def test_a_holder_hears_of_events_queued_by_another_worker(harness: StoreHarness) -> None:
    worker_a, worker_b = await harness.open(), await harness.open()
    state = new_state()
    holder = await worker_a.create(state, "conn-1")

    await worker_b.enqueue_event(state.session_id, {"type": "e", "data": {"n": 1}})

    await wait_set(holder.events_waiting)
    assert await worker_a.drain_events(holder) == [{"type": "e", "data": {"n": 1}}]


async def test_an_ended_session_answers_expired_and_its_holder_lets_go(harness: StoreHarness) -> None:
    worker_a, worker_b = await harness.open(), await harness.open()
    state = new_state()
    holder = await worker_a.create(state, "conn-1")

    await worker_b.delete(state.session_id)

    with pytest.raises(SessionExpired) as ended:
        await worker_a.load(state.session_id)
    assert ended.value.reason == "ended"
    await wait_set(holder.taken_over)
    with pytest.raises(SessionExpired):
        await worker_a.attach(state.session_id, "conn-2")
    await worker_b.delete(state.session_id)


async def test_a_session_expires_after_the_window_and_its_tombstone_after_another(harness: StoreHarness) -> None:
    window = 1.0
    store = await harness.open(resume_window=window, tombstone_ttl=window)
    state = new_state()
    attachment = await store.create(state, "conn-1")
    await store.detach(attachment)

    await asyncio.sleep(window + 0.3)
    with pytest.raises(SessionExpired) as expired:
        await store.load(state.session_id)
    assert expired.value.reason == "expired"
    with pytest.raises(SessionExpired):
        await store.append_message(state.session_id, sender="a", content="b", origin="recorded")
    with pytest.raises(SessionExpired):
        await store.attach(state.session_id, "conn-2")

    await asyncio.sleep(window + 0.6)
    with pytest.raises(SessionNotFound):
        await store.load(state.session_id)


async def test_activity_keeps_a_session_alive(harness: StoreHarness) -> None:
    window = 1.0
    store = await harness.open(resume_window=window)
    state = new_state()
    await store.create(state, "conn-1")

    for _ in range(4):
        await asyncio.sleep(window / 2)
        await store.touch(state.session_id)

    assert (await store.load(state.session_id)).session_id == state.session_id


async def test_sessions_survive_closing_and_reopening_the_store(harness: StoreHarness) -> None:
    store = await harness.open()
    state = new_state()
    attachment = await store.create(state, "conn-1")
    await store.append_message(state.session_id, sender="医生", content="再见", origin="recorded")
    await store.detach(attachment)
    await store.enqueue_event(state.session_id, {"type": "e", "data": {}})
    await harness.close(store)

    reopened = await harness.open()
    loaded = await reopened.load(state.session_id)
    resumed = await reopened.attach(state.session_id, "conn-2")

    assert [m.content for m in loaded.messages][-1] == "再见"
    assert resumed.epoch == 2
    assert await reopened.drain_events(resumed) == [{"type": "e", "data": {}}]


def start_writers(harness: StoreHarness, session_id: str, writers: int, count: int) -> list[subprocess.Popen[bytes]]:
    start_at = time.time() + 1.0
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harness.store_writer",
                orjson.dumps(
                    {**harness.spec, "session_id": session_id, "count": count, "writer": n, "start_at": start_at}
                ).decode(),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(writers)
    ]


async def test_worker_processes_append_to_one_session_concurrently(harness: StoreHarness) -> None:
    store = await harness.open()
    state = new_state(messages=[])
    await store.create(state, "conn-1")
    writers, count = 4, 40

    outputs = [process.communicate(timeout=120) for process in start_writers(harness, state.session_id, writers, count)]

    assert all(not err for _, err in outputs), [err.decode() for _, err in outputs]
    confirmed = [line for out, _ in outputs for line in out.decode().split()]
    assert sorted(confirmed) == [f"msg_{n:03d}" for n in range(1, writers * count + 1)]
    messages = (await store.load(state.session_id)).messages
    assert [m.message_id for m in messages] == [f"msg_{n:03d}" for n in range(1, writers * count + 1)]
    for writer in range(writers):
        mine = [m.content for m in messages if m.sender == f"writer-{writer}"]
        assert mine == [f"{writer}:{index}" for index in range(count)]


async def test_everything_confirmed_before_a_writer_is_killed_is_kept(harness: StoreHarness) -> None:
    store = await harness.open()
    state = new_state(messages=[])
    await store.create(state, "conn-1")
    (writer,) = start_writers(harness, state.session_id, 1, 100_000)
    assert writer.stdout is not None
    for _ in range(50):
        writer.stdout.readline()

    writer.kill()
    writer.wait(30)
    # The buffered reader, not communicate(): lines already read into its buffer count too.
    remaining = writer.stdout.read()

    confirmed = 50 + len(remaining.split())
    stored = len((await store.load(state.session_id)).messages)
    # A kill between commit and print loses the print, never the commit.
    assert stored in (confirmed, confirmed + 1)


async def test_operations_are_timed_by_operation_and_backend(harness: StoreHarness) -> None:
    store = await harness.open()
    before = latency_count("append_message", harness.backend)
    state = new_state()
    await store.create(state, "conn-1")

    await store.append_message(state.session_id, sender="a", content="b", origin="recorded")

    assert latency_count("append_message", harness.backend) == before + 1
