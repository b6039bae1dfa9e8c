"""The session store's readiness check exercises the store for real and leaves nothing behind."""

from __future__ import annotations

from server.conversation import Services
from tests.support.inprocess import Connect


async def test_the_readiness_probe_goes_through_the_store_and_leaves_no_trace(
    connect: Connect, services: Services
) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        assert services.sessions.health() == "healthy"
        assert len(services.sessions) == 1, "the probe session is gone"
        assert services.sessions.owned_by(client.conversation.connection_id) == [session_id]
        await client.still_works(session_id)


async def test_the_readiness_probe_reports_a_store_that_lost_track_of_an_owner(services: Services) -> None:
    session = services.sessions.create("connection-a", 2)
    assert services.sessions.health() == "healthy"
    services.sessions._owners.pop(session.session_id)  # what a bug in end/forget would leave behind
    assert services.sessions.health() == "degraded"
