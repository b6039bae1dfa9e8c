"""Shared fixtures: the protocol logic in-process, real mock-engine servers, and audio to send them.

In-process (`services`, `connect`): `Conversation` driven directly, fresh state per test, no
network. End-to-end: `workers` is a session-scoped parameter (1 and 2) and every server fixture
built on it starts `python -m server` with that many Sanic workers.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pytest

from harness.fake_openrouter import FakeOpenRouter
from harness.server import ServerProcess
from server.conversation import Services
from tests.support.apps import start_app_backend
from tests.support.inprocess import Connect, FakeTranscriber, build_services, close_stores, connector

WORKER_COUNTS = (1, 2)
SAMPLE_RATE = 16000
LIMITED_MESSAGE_BYTES = 65536
LIMITED_RECORDING_SECONDS = 1


def speech(seconds: float, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """A loud 440 Hz tone as PCM s16le: the mock transcriber reports it as speech."""
    count = round(seconds * sample_rate)
    tone = (3000 * np.sin(2 * math.pi * 440 * np.arange(count) / sample_rate)).astype("<i2")
    return np.repeat(tone, channels).tobytes()


def silence(seconds: float, sample_rate: int = SAMPLE_RATE) -> bytes:
    return bytes(2 * round(seconds * sample_rate))


def running_server(**env: Any) -> AbstractContextManager[ServerProcess]:
    """`python -m server` with `env` on top of the test defaults, ready to use (every worker ready)."""
    return ServerProcess(**env)


@pytest.fixture(autouse=True)
async def close_inprocess_stores() -> AsyncIterator[None]:
    """The session stores in-process tests opened are closed after each test (threads, files)."""
    yield
    await close_stores()


@pytest.fixture
def services() -> Services:
    """Fresh in-process services with default settings, the fake transcriber and the mock provider."""
    return build_services()


@pytest.fixture
def connect(services: Services) -> Connect:
    return connector(services)


@pytest.fixture
def transcriber(services: Services) -> FakeTranscriber:
    assert isinstance(services.transcriber, FakeTranscriber)
    return services.transcriber


@pytest.fixture(scope="session", params=WORKER_COUNTS, ids=[f"workers{n}" for n in WORKER_COUNTS])
def workers(request: pytest.FixtureRequest) -> int:
    count: int = request.param
    return count


@pytest.fixture(scope="session")
def server(workers: int) -> Iterator[ServerProcess]:
    """The service with default settings and mock engines."""
    with running_server(WORKERS=workers) as started:
        yield started


@pytest.fixture(scope="session")
def limited_server(workers: int) -> Iterator[ServerProcess]:
    """Small limits: frames of at most 64 KiB, recordings of at most 1 s."""
    with running_server(
        WORKERS=workers,
        MAX_MESSAGE_BYTES=LIMITED_MESSAGE_BYTES,
        MAX_RECORDING_SECONDS=LIMITED_RECORDING_SECONDS,
    ) as started:
        yield started


@pytest.fixture(scope="session")
def app_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, FakeOpenRouter]]:
    """The backend of the app replay suites (tests/support/apps.py), shared by both app generations."""
    with start_app_backend(tmp_path_factory.mktemp("model")) as started:
        yield started


@pytest.fixture
def app_server(app_backend: tuple[ServerProcess, FakeOpenRouter]) -> ServerProcess:
    app_backend[1].reset()
    return app_backend[0]


@pytest.fixture
def fake_provider(app_backend: tuple[ServerProcess, FakeOpenRouter]) -> FakeOpenRouter:
    return app_backend[1]


@pytest.fixture(scope="session")
def mock_server() -> Iterator[ServerProcess]:
    """One default server (one worker) for tests that need a backend but not the worker matrix."""
    with running_server() as started:
        yield started


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenRouter]:
    """A local OpenAI-compatible server for one module's tests (OpenRouter itself cannot be reached here)."""
    with FakeOpenRouter() as server:
        yield server


@pytest.fixture
def fresh_fake(fake: FakeOpenRouter) -> FakeOpenRouter:
    """The module's fake provider with no requests recorded and no scripted answers left from earlier tests."""
    fake.reset()
    return fake


def service_against_fake(key: str, **settings: Any) -> Any:
    """A module's `service` fixture: the real service, its OpenRouter client using `key` against the module's
    `fake` provider, with `settings` (environment variables) of its own."""

    @pytest.fixture(scope="module")
    def service(fake: FakeOpenRouter) -> Iterator[ServerProcess]:
        with ServerProcess(OPENROUTER_API_KEY=key, OPENROUTER_BASE_URL=fake.url, **settings) as server:
            yield server

    return service
