"""The supervisor's restart schedule, in this process: dead decoders are collected without waiting,
and only decoders that die young are restarted after a back-off."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stt_pool.status import PoolStatus, SlotState
from stt_pool.supervisor import MAX_BACKOFF, PoolConfig, Supervisor


@pytest.fixture
def supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Supervisor, list[int]]]:
    config = PoolConfig(
        runtime_dir=tmp_path,
        model_path=tmp_path,
        workers=1,
        streams_per_worker=1,
        max_backlog_ms=1000,
        piece_ms=100,
        partial_interval=0.2,
    )
    supervisor = Supervisor(config, None, PoolStatus.create(tmp_path, 1), threading.Event())
    spawned: list[int] = []
    monkeypatch.setattr(supervisor, "spawn", spawned.append)  # no real decoders
    yield supervisor, spawned
    for listener in supervisor.listeners:
        listener.close()


def bury(supervisor: Supervisor, lived: float) -> None:
    """A decoder of slot 0 that ran `lived` seconds (beating its heart until the end) exits."""
    pid = os.fork()
    if pid == 0:
        os._exit(1)
    supervisor.children[pid] = 0
    supervisor.spawned_at[0] = time.monotonic() - lived
    supervisor.status.slots[0].heartbeat = time.time()
    deadline = time.monotonic() + 30
    while supervisor.children:
        assert time.monotonic() < deadline, "the dead decoder was never collected"
        supervisor._reap()
        time.sleep(0.01)


def test_a_decoder_that_keeps_dying_young_is_restarted_later_without_blocking_the_loop(supervisor):
    supervisor, spawned = supervisor
    supervisor.failures[0] = 10
    bury(supervisor, lived=0.0)
    assert spawned == [], "collecting the dead decoder returned at once, before its back-off"
    assert supervisor.status.slots[0].state == SlotState.DEAD
    assert supervisor.restarts_due[0] > time.monotonic() + MAX_BACKOFF / 2
    supervisor._restart_due()
    assert spawned == []
    supervisor.restarts_due[0] = time.monotonic()
    supervisor._restart_due()
    assert spawned == [0]
    assert supervisor.restarts_due == {}


def test_a_decoder_that_ran_a_while_is_replaced_at_once_and_its_failures_forgotten(supervisor):
    supervisor, spawned = supervisor
    supervisor.failures[0] = 3
    bury(supervisor, lived=60.0)
    supervisor._restart_due()
    assert spawned == [0]
    assert supervisor.failures[0] == 0
    assert int(supervisor.status.header.restarts) == 1


def test_nothing_is_restarted_once_stop_was_requested(supervisor):
    supervisor, spawned = supervisor
    supervisor.stop_requested.set()
    bury(supervisor, lived=60.0)
    supervisor._restart_due()
    assert spawned == []
