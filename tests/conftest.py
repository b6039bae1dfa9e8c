"""Shared fixtures: a real mock-engine server for the protocol tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import ServerProcess


@pytest.fixture(scope="session")
def mock_server() -> Iterator[ServerProcess]:
    with ServerProcess() as server:
        yield server
