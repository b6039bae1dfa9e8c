"""Two instances on two ports sharing one real `redis-server`, behind the project's nginx site with
both as upstreams: the instance holding a conversation dies (SIGKILL) or is restarted for a
deploy (SIGTERM mid-recording), the app reconnects through nginx and resumes on the other one.

The instances run the labelled mock transcriber (its transcript says how many seconds of audio
it got), so these tests are about the sessions, not about speech.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest
import websockets

from harness.client import ProtocolClient
from harness.redis_server import RedisServer
from harness.server import ServerProcess
from tests.conftest import speech
from tests.support.nginx import Nginx, plain_site
from tests.support.resume import (
    cut_recording_delivered,
    events_until_closed,
    reconnect,
    resume,
    resume_checked,
    send_unfinished_recording,
)

SCENARIO = "在银行柜台办业务"
GOING_AWAY_FOR_RESTART = 1012


class Cluster:
    def __init__(self, instances: tuple[ServerProcess, ServerProcess], proxy: Nginx) -> None:
        self.instances = instances
        self.url = f"ws://127.0.0.1:{proxy.http_port}/conversation"

    def holder(self) -> tuple[ServerProcess, ServerProcess]:
        """(the instance holding the one open conversation, the other one)."""
        holding = [instance for instance in self.instances if instance.established_connections()]
        assert len(holding) == 1, "exactly one instance holds the proxied connection"
        other = next(instance for instance in self.instances if instance is not holding[0])
        return holding[0], other


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with (
        RedisServer() as redis,
        ServerProcess(SESSION_STORE_URL=redis.url) as first,
        ServerProcess(SESSION_STORE_URL=redis.url) as second,
        Nginx(tmp_path_factory.mktemp("nginx"), plain_site(), backend_port=[first.port, second.port]) as proxy,
    ):
        assert f"server 127.0.0.1:{first.port};" in proxy.site and f"server 127.0.0.1:{second.port};" in proxy.site
        yield Cluster((first, second), proxy)


def seconds_heard(recorded: dict[str, object]) -> str:
    return str(recorded["content"]).split("收到 ")[1].split(" 秒")[0]


async def test_the_instance_holding_the_conversation_dies_and_the_other_resumes_it(cluster: Cluster) -> None:
    async with ProtocolClient(cluster.url) as phone:
        session_id = await phone.start_session(3, scenario_description=SCENARIO)
        recorded = await phone.record(session_id, speech(2.0), sender="柜员")
        assert seconds_heard(recorded) == "2.0", recorded
        assert (await phone.select(session_id, "我想办一张卡"))["message_id"] == "usr_002"
        holder, other = cluster.holder()
        await asyncio.to_thread(holder.kill)
        with pytest.raises(websockets.ConnectionClosed):
            await phone.recv(30.0)  # nginx closes the client's side when its upstream dies
    async with reconnect(cluster.url) as phone:  # the dead instance refuses, nginx tries the other
        await resume_checked(phone, session_id, message_count=2, response_count=3, scenario_description=SCENARIO)
        assert cluster.holder()[0] is other
        await phone.expect_silence(0.5)
        assert (await phone.select(session_id, "需要带身份证吗"))["message_id"] == "usr_003"
    await asyncio.to_thread(holder.start)


async def test_a_deploy_restart_mid_recording_is_resumed_on_the_other_instance(cluster: Cluster) -> None:
    async with ProtocolClient(cluster.url) as phone:
        session_id = await phone.start_session(3, scenario_description=SCENARIO)
        await send_unfinished_recording(phone, session_id, speech(3.0), sender="柜员")
        holder, other = cluster.holder()
        holder.send_signal(signal.SIGTERM)
        before_close, code = await events_until_closed(phone, 30.0)
        assert code == GOING_AWAY_FOR_RESTART, "nginx passes the backend's close frame on to the app"
    assert await asyncio.to_thread(holder.wait, 60.0) == 0, holder.logs()[-3000:]
    async with reconnect(cluster.url) as phone:
        restored = await resume(phone, session_id)
        assert cluster.holder()[0] is other
        assert restored["message_count"] == 1, restored
        recorded = await cut_recording_delivered(phone, before_close)
        assert recorded["message_id"] == "msg_001" and seconds_heard(recorded) == "3.0", recorded
        await phone.expect_silence(0.5)
        assert (await phone.select(session_id, "好的"))["message_id"] == "usr_002"
    await asyncio.to_thread(holder.start)
