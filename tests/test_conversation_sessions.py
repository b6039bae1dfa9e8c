"""The sessions a worker holds are a cache of the session store: every change is in the store before it is confirmed."""

from __future__ import annotations

from server.conversation import Services
from tests.support.inprocess import Connect


async def test_the_cache_holds_what_the_store_holds(connect: Connect, services: Services) -> None:
    async with connect() as client:
        session_id = await client.create_session(scenario_description="在药店")
        await client.expect("opinion_suggestions")
        await client.send("response_count_update", session_id=session_id, response_count=2)
        await client.send("scenario_supplement", session_id=session_id, supplement="对方说得很快")
        await client.send("user_selected_response", session_id=session_id, selected_content="好的", sender="我")
        await client.expect_recorded(session_id, "usr_001", "我", spoken=False)
        [held] = services.sessions.owned_by(client.conversation.connection_id)
        stored = await services.store.load(session_id)
        cached = held.session
        assert stored.response_count == cached.response_count
        assert stored.scenario_supplement == cached.scenario_supplement
        assert [(m.message_id, m.content) for m in stored.messages] == [
            (m.message_id, m.content) for m in cached.messages
        ]
        assert stored.response_count == 2 and stored.scenario_supplement == "对方说得很快"
        await client.still_works(session_id)
    assert len(services.sessions) == 0, "a closed connection holds nothing"
