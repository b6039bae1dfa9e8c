"""A bounded chaos run against the real service: many clients, bad frames, dropped connections,
decoders killed and paused; then what must hold once everybody is gone.

`run_chaos` drives a running `ServerProcess` (the real Vosk pool, the mock LLM) for `seconds`:
each client opens connections one after another and plays random scenarios on them (a recording
of a speech fixture with bad audio events in between, a burst of bad frames, a whole conversation,
an oversize frame), sometimes dropping the connection mid-recording or right after `message_end`;
meanwhile decoders are SIGKILLed and SIGSTOPped. Every choice comes from one seed, printed in the
report, so a failure can be replayed with the same choices (timing still varies).
`Report.problems()` lists what broke the rules; tests/test_chaos.py and `python -m bench.soak`
share all of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import Settings
from harness.chaos_aftermath import Aftermath, log_problems, resident_memory, sanic_workers, settle
from harness.chaos_connection import ChaosConnection, Gone, Tally, either, for_session
from harness.chaos_events import audio_fault, event, session_frame, stray_frame
from harness.client import ProtocolClient, b64
from harness.server import ServerProcess
from harness.speech import read_pcm
from stt_pool.status import PoolStatus, SlotState

# Two Sanic workers on one pool of two decoders taking two recordings each (a busy 2-core machine
# keeps up with that in real time); the mock LLM answers after 50 ms.
SERVER_SETTINGS: dict[str, Any] = {
    "WORKERS": 2,
    "STT_WORKERS": 2,
    "STT_STREAMS_PER_WORKER": 2,
    "MOCK_LLM_DELAY_MS": 50,
}
FRAME_LIMIT: int = Settings.model_fields["max_message_bytes"].default
TRANSCRIPT_WAIT = 120.0  # a final transcript behind a paused decoder and a full backlog
ANSWER_WAIT = 30.0
RSS_MARGIN = 100 * 2**20
DISTURB_EVERY = 3.0
RECORDING_WEIGHTS = {"short": 8, "long": 1, "silence": 1, "empty": 1}


@dataclass
class Context:
    url: str
    tally: Tally
    audio: dict[str, bytes]
    expected: dict[str, str]
    deadline: float


async def new_session(conn: ChaosConnection, **data: Any) -> str:
    await conn.send_event("conversation_start", response_count=data.pop("response_count", 3), **data)
    created = await conn.take(lambda candidate: candidate["type"] == "session_created", ANSWER_WAIT)
    session_id: str = created["data"]["session_id"]
    conn.sessions.add(session_id)
    return session_id


async def record(ctx: Context, conn: ChaosConnection, rng: random.Random) -> None:
    """A recording of a fixture, bad audio events and stray frames in between; maybe a drop."""
    tally = ctx.tally
    session_id = await new_session(conn, options={"partial_transcripts": rng.random() < 0.3})
    names = list(ctx.audio)
    name = rng.choices(names, [RECORDING_WEIGHTS[name] for name in names])[0]
    # Mostly as the app sends (real time), sometimes far ahead of it (0: as fast as the socket takes it).
    pace = rng.choice([1.0, 1.0, 1.0, 2.0, 4.0, 0.0])
    if pace and time.monotonic() + len(ctx.audio[name]) / 32000 / pace > ctx.deadline:
        name = "short"  # the run ends soon: no long recording past its end
    pcm = ctx.audio[name]
    drop = rng.choices(["none", "mid", "after_end"], [16, 3, 1])[0]
    await conn.send_event("message_start", session_id=session_id, sender="对方")
    answer = await conn.take(
        either(for_session(session_id, "status_update", status="recording_message"), for_session(session_id, "error")),
        ANSWER_WAIT,
    )
    if answer["type"] == "error":
        tally.recordings[f"refused ({answer['data']['error_code']})"] += 1
        await asyncio.sleep(rng.uniform(0.5, 2.0))  # the person taps again after the app's snackbar
        return
    tally.recordings["opened"] += 1
    drop_at = rng.randrange(len(pcm)) if drop == "mid" and pcm else 0
    offset = 0
    while offset < len(pcm):
        if drop == "mid" and offset >= drop_at:
            break
        # Cut at any byte, as recorders and browser buffers may: a sample can straddle two chunks.
        chunk = pcm[offset : offset + rng.randint(1600, 32000)]
        await conn.send_event("audio_stream", session_id=session_id, audio_chunk=b64(chunk))
        offset += len(chunk)
        if rng.random() < 0.12:
            kind, frame = audio_fault(rng, session_id)
            await conn.send(f"invalid:{kind}", frame)
        if rng.random() < 0.08:
            kind, frame = stray_frame(rng)
            await conn.send(f"invalid:{kind}", frame)
        await asyncio.sleep(len(chunk) / 32000 / pace if pace else 0)
    if drop == "mid":
        tally.recordings["dropped mid-recording"] += 1
        await conn.drop()
        return
    await conn.send_event("message_end", session_id=session_id)
    if drop == "after_end":
        tally.recordings["dropped right after message_end"] += 1
        await conn.drop()
        return
    tally.recordings["reached message_end"] += 1
    await _await_transcript(ctx, conn, session_id, name)


async def _await_transcript(ctx: Context, conn: ChaosConnection, session_id: str, name: str) -> None:
    """message_recorded must come; an error that keeps the recording is answered by another message_end."""
    tally = ctx.tally

    def kept_for_retry(candidate: dict[str, Any]) -> bool:
        return for_session(session_id, "error")(candidate) and "message_end" in candidate["data"]["message"]

    for _ in range(4):
        try:
            answer = await conn.take(
                either(for_session(session_id, "message_recorded"), kept_for_retry), TRANSCRIPT_WAIT
            )
        except (TimeoutError, Gone) as error:
            tally.failures.append(f"no transcript for {name} in session {session_id}: {error!r}")
            conn.dropped = True  # the connection is of no more use to this client
            return
        if answer["type"] == "message_recorded":
            tally.recordings["transcribed"] += 1
            if answer["data"]["content"] != ctx.expected[name]:
                tally.failures.append(
                    f"{name} in session {session_id}: {answer['data']['content']!r} != {ctx.expected[name]!r}"
                )
            return
        tally.recordings[f"message_end resent after {answer['data']['error_code']}"] += 1
        await conn.send_event("message_end", session_id=session_id)
    tally.failures.append(f"no transcript for {name} in session {session_id} after 4 message_end")


async def garbage(ctx: Context, conn: ChaosConnection, rng: random.Random) -> None:
    """A burst of bad frames, each answered by one error; then the session still works."""
    session_id = await new_session(conn)
    before = len(conn.errors)
    count = rng.randint(3, 12)
    for _ in range(count):
        kind, frame = stray_frame(rng) if rng.random() < 0.5 else session_frame(rng, session_id)
        await conn.send(f"invalid:{kind}", frame)
    await conn.send_event("user_selected_response", session_id=session_id, selected_content="好的", sender="我")
    await conn.take(for_session(session_id, "message_recorded", content="好的"), ANSWER_WAIT)
    others = conn.sessions - {session_id}
    answered = sum(1 for error in conn.errors[before:] if error.get("session_id") not in others)
    ctx.tally.unanswered += abs(count - answered)


async def conversation(ctx: Context, conn: ChaosConnection, rng: random.Random) -> None:
    """Valid generations on a session with context, its end, and an event for the ended session."""
    session_id = await new_session(
        conn,
        response_count=rng.randint(1, 5),
        scenario_description="在药店买药",
        history_messages=[{"message_id": "h1", "sender": "对方", "content": "您需要什么药？"}],
    )
    replied = either(for_session(session_id, "llm_response"), for_session(session_id, "error"))
    for step in rng.sample(["generate", "modify", "supplement", "count", "select"], rng.randint(1, 5)):
        if step == "generate":
            await conn.send_event("manual_generate", session_id=session_id, user_opinion="同意")
            await conn.take(replied, ANSWER_WAIT)
        elif step == "modify":
            await conn.send_event("user_modification", session_id=session_id, modification="更礼貌一些")
            await conn.take(replied, ANSWER_WAIT)
        elif step == "supplement":
            await conn.send_event("scenario_supplement", session_id=session_id, supplement="对方是药剂师")
        elif step == "count":
            await conn.send_event("response_count_update", session_id=session_id, response_count=rng.randint(1, 5))
        else:
            await conn.send_event("user_selected_response", session_id=session_id, selected_content="谢谢", sender="我")
            await conn.take(for_session(session_id, "message_recorded", content="谢谢"), ANSWER_WAIT)
    await conn.send_event("conversation_end", session_id=session_id)
    await conn.take(for_session(session_id, "profile_archive"), ANSWER_WAIT)
    await conn.send_event("manual_generate", session_id=session_id)
    await conn.take(for_session(session_id, "error", error_code="SESSION_EXPIRED"), ANSWER_WAIT)


async def oversize_frame(ctx: Context, conn: ChaosConnection, rng: random.Random) -> None:
    """A frame above MAX_MESSAGE_BYTES: the server closes the connection with 1009."""
    conn.dropped = True
    await conn.send(
        "invalid:oversize_frame", event("user_modification", pad="a" * (FRAME_LIMIT + rng.randint(1, 9999)))
    )
    with contextlib.suppress(Gone):
        await conn.take(lambda candidate: False, ANSWER_WAIT)
    code = conn.close_code
    ctx.tally.closes[f"{code} after an oversize frame"] += 1
    if code != 1009:
        ctx.tally.failures.append(f"an oversize frame was answered by close code {code}, not 1009")


Scenario = Callable[[Context, ChaosConnection, random.Random], Awaitable[None]]
SCENARIOS: dict[Scenario, float] = {record: 6, garbage: 3, conversation: 2, oversize_frame: 0.3}


async def client(ctx: Context, rng: random.Random, deadline: float) -> None:
    """Connections one after another until `deadline`, a few scenarios on each."""
    while time.monotonic() < deadline:
        conn = ChaosConnection(ctx.url, ctx.tally)
        scenario_name = "connect"
        try:
            await conn.open()
            for _ in range(rng.randint(1, 5)):
                scenario = rng.choices(list(SCENARIOS), list(SCENARIOS.values()))[0]
                scenario_name = scenario.__name__
                await scenario(ctx, conn, rng)
                if conn.dropped or time.monotonic() >= deadline:
                    break
        except Gone as error:
            ctx.tally.closes[f"{conn.close_code} unexpected"] += 1
            ctx.tally.failures.append(f"{scenario_name}: connection {error}")
        except TimeoutError:
            ctx.tally.failures.append(f"{scenario_name}: no answer within its time")
        finally:
            await conn.close()


async def disturb_decoders(ctx: Context, runtime_dir: Path, rng: random.Random, deadline: float, every: float) -> None:
    """Alternately SIGKILL the busiest decoder and SIGSTOP one for 2-7 s (always SIGCONTed)."""
    status = PoolStatus.attach(runtime_dir)
    assert status is not None, "the pool's status table exists once the server is ready"
    tally = ctx.tally
    kill_next = rng.random() < 0.5
    while time.monotonic() + 2 < deadline:
        await asyncio.sleep(rng.uniform(0.5, 1.5) * every)
        if kill_next:
            await _kill_busy_decoder(status, tally)
        else:
            live = [slot for slot in status.slots if slot.state == SlotState.READY and slot.pid > 0]
            if not live:
                continue
            pid = int(rng.choice(live).pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                tally.pauses += 1
                try:
                    await asyncio.sleep(rng.uniform(2.0, 7.0))
                finally:
                    os.kill(pid, signal.SIGCONT)
        kill_next = not kill_next


async def _kill_busy_decoder(status: PoolStatus, tally: Tally) -> None:
    """Kill the decoder holding the most streams, waiting up to 2 s for one that holds any."""
    wait_until = time.monotonic() + 2
    while True:
        live = [slot for slot in status.slots if slot.state == SlotState.READY and slot.pid > 0]
        busiest = max(live, key=lambda slot: int(slot.streams), default=None)
        if busiest is not None and (busiest.streams > 0 or time.monotonic() > wait_until):
            break
        await asyncio.sleep(0.05)
    streams = int(busiest.streams)
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(busiest.pid), signal.SIGKILL)
        tally.kills += 1
        tally.busy_kills += int(streams > 0)
        tally.streams_on_killed += streams


@dataclass
class Report:
    seed: int
    clients: int
    seconds: float
    tally: Tally
    expected: dict[str, str]
    workers_before: dict[int, str]
    rss_before: dict[int, int]
    after: Aftermath
    wall: float
    drain: float  # from the deadline until the last client finished its scenario
    log_problems: list[str]

    def problems(self) -> list[str]:
        found = list(self.tally.failures) + self.log_problems
        if self.after.workers != self.workers_before:
            found.append(f"Sanic workers changed: {self.workers_before} -> {self.after.workers}")
        if self.after.stt_health != "healthy" or self.after.decoders_alive != len(self.after.streams):
            found.append(f"the pool did not heal: {self.after.decoders_alive} decoders, {self.after.stt_health}")
        if not self.after.quiet:
            found.append(
                f"left open after {self.after.waited:.0f} s: gauges {self.after.gauges}, "
                f"streams {self.after.streams}, PCM files {self.after.pcm_files}"
            )
        for pid, before in self.rss_before.items():
            after = self.after.rss.get(pid)
            if after is not None and after > before + RSS_MARGIN:
                found.append(f"worker {pid} grew from {before / 2**20:.0f} MB to {after / 2**20:.0f} MB")
        if self.tally.errors["INTERNAL_ERROR"]:
            found.append(f"{self.tally.errors['INTERNAL_ERROR']} INTERNAL_ERROR events")
        if self.tally.unanswered:
            found.append(f"{self.tally.unanswered} bad frames without exactly one error each")
        return found

    def lines(self) -> list[str]:
        tally = self.tally
        invalid = sum(count for kind, count in tally.frames.items() if kind.startswith("invalid:"))
        mb = 2**20
        rss = ", ".join(
            f"{self.workers_before[pid]} {before / mb:.0f} -> {self.after.rss.get(pid, 0) / mb:.0f} MB"
            for pid, before in self.rss_before.items()
        )
        return [
            f"chaos seed {self.seed} (replay: --seed {self.seed}); {self.clients} clients for {self.seconds:g} s, "
            f"{self.wall:.1f} s wall in all (last scenarios finished {self.drain:.1f} s after the deadline)",
            f"connections {tally.connections}; frames sent {sum(tally.frames.values())} "
            f"(invalid {invalid}, audio chunks {tally.frames['audio_stream']})",
            "errors received: " + ", ".join(f"{code} {count}" for code, count in tally.errors.most_common()),
            "connections closed by the server: "
            + (", ".join(f"{kind} {count}" for kind, count in tally.closes.most_common()) or "none"),
            f"decoders: {tally.kills} SIGKILLs ({tally.busy_kills} of a busy one, {tally.streams_on_killed} streams "
            f"replayed), {tally.pauses} SIGSTOP/SIGCONT pauses",
            "recordings: " + ", ".join(f"{kind} {count}" for kind, count in sorted(tally.recordings.items())),
            f"Sanic worker RSS: {rss}",
            f"afterwards (settled in {self.after.waited:.1f} s): gauges {self.after.gauges}, pool streams "
            f"{self.after.streams}, decoders alive {self.after.decoders_alive}, stt {self.after.stt_health}, "
            f"PCM files {len(self.after.pcm_files)}",
        ]


async def reference_transcripts(server: ServerProcess, audio: dict[str, bytes]) -> dict[str, str]:
    """What the quiet service answers for each fixture: under chaos the answer must be the same."""

    async def transcript(pcm: bytes) -> str:
        async with ProtocolClient(server.ws_url) as quiet:
            session_id = await quiet.start_session()
            content: str = (await quiet.record(session_id, pcm))["content"]
            await quiet.end_session(session_id)
            return content

    # One recording per decoder at a time, so the quiet answers take no longer than the longest.
    texts = await asyncio.gather(*(transcript(pcm) for pcm in audio.values()))
    return dict(zip(audio, texts, strict=True))


async def run_chaos(
    server: ServerProcess,
    seconds: float,
    clients: int,
    seed: int,
    *,
    disturb_every: float = DISTURB_EVERY,
    long_recordings: bool = True,
) -> Report:
    """`long_recordings`: whether recordings of the 19 s fixture are among the 3.7 s ones, silence
    and empty ones (a short run on a busy machine spends most of its time decoding them).
    `disturb_every`: mean seconds between two decoder disturbances (kills and pauses alternate).
    A replayed recording is decoded again from its start, so kills much more frequent than the
    decoding of a long recording under load would keep it from ever finishing."""
    started = time.monotonic()
    rng = random.Random(seed)
    audio = {"short": read_pcm("ko_short.wav"), "silence": bytes(32000), "empty": b""}
    if long_recordings:
        audio["long"] = read_pcm("ko_long.wav")
    expected = await reference_transcripts(server, audio)
    assert all(expected[name] for name in ("short", "long") if name in audio), f"fixtures recognised: {expected}"
    workers_before = sanic_workers(server)
    rss_before = resident_memory(list(workers_before))
    deadline = time.monotonic() + seconds
    ctx = Context(server.ws_url, Tally(), audio, expected, deadline)
    client_rngs = [random.Random(rng.getrandbits(64)) for _ in range(clients)]
    await asyncio.gather(
        disturb_decoders(
            ctx, Path(server.env["RUNTIME_DIR"]), random.Random(rng.getrandbits(64)), deadline, disturb_every
        ),
        *(client(ctx, client_rng, deadline) for client_rng in client_rngs),
    )
    drain = time.monotonic() - deadline
    after = await settle(server, int(server.env["STT_WORKERS"]))
    return Report(
        seed=seed,
        clients=clients,
        seconds=seconds,
        tally=ctx.tally,
        expected=expected,
        workers_before=workers_before,
        rss_before=rss_before,
        after=after,
        wall=time.monotonic() - started,
        drain=drain,
        log_problems=log_problems(server),
    )
