"""The shared session store: Redis, for several instances behind a load balancer.

Every operation is one Lua script (or one MULTI), so it is atomic and committed when Redis
answers; how durable a commit is beyond that is the Redis server's persistence setting: with
`appendonly yes` and `appendfsync always` every acknowledged write survives a killed Redis and a
power loss; with `everysec` (Redis's default) a clean restart keeps everything, but a crash may
lose the last second (Redis may answer before its file write when an fsync is slow).

A session is six keys sharing one hash tag (one cluster slot): `state` (a hash: each session
field as JSON under `f:<name>`, plus epoch, holder, the holder's signal channel, message count,
last activity), `messages` and `modifications` (lists), `outbox` (a list of event JSON), `ids`
(the set of message ids, so a new id never repeats a history message's) and `mark`. Data keys
expire `resume_window` after the last activity (Redis purges them); `mark` outlives them by
`tombstone_ttl` and says whether an absent session expired or was ended.

Each store (one per worker process) subscribes to a channel of its own; the holder's channel is
recorded with the attachment, so a takeover or a queued event is published to exactly the
process that must hear it. After the subscription is (re)established every local attachment is
checked against the store, so nothing published while the connection was down is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.retry import Retry

from server.store.errors import SessionExpired, SessionNotFound, SessionTakenOver, StoreUnavailable
from server.store.interface import DEFAULT_OUTBOX_LIMIT, SessionStore, check_updatable, timed
from server.store.model import ID_PREFIX, Attachment, Event, Origin, SessionState, StoredMessage

log = logging.getLogger("server.store")

DEFAULT_PREFIX = "adb:session:"
PARTS = ("state", "messages", "outbox", "modifications", "ids", "mark")
LISTEN_RETRY_SECONDS = 1.0

# KEYS: state, messages, outbox, modifications, ids, mark. ARGV[1..3]: window ms, tombstone ms, now.
# `absent()` is the reply for a session that is not there (nil when it is); `held()` its epoch and
# holder, which every write returns so that holders in the writing process learn of a takeover.
PRELUDE = """
local function absent()
  if redis.call('EXISTS', KEYS[1]) == 1 then return nil end
  local mark = redis.call('GET', KEYS[6])
  if mark == 'ended' then return {'ended'} end
  if mark then return {'expired'} end
  return {'missing'}
end
local function held()
  return redis.call('HMGET', KEYS[1], 'epoch', 'holder')
end
local function refresh()
  local window = tonumber(ARGV[1])
  redis.call('HSET', KEYS[1], 'last_activity', ARGV[3])
  for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], window) end
  redis.call('SET', KEYS[6], 'live', 'PX', window + tonumber(ARGV[2]))
end
"""

# ARGV[4] token, [5] channel, [6] message count n, [7] modification count m, then n messages,
# their n ids, m modifications, then field name/value pairs.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local n, m = tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('HSET', KEYS[1], 'epoch', 1, 'holder', ARGV[4], 'channel', ARGV[5], 'message_count', n)
for i = 8, 7 + n do redis.call('RPUSH', KEYS[2], ARGV[i]) end
for i = 8 + n, 7 + 2 * n do redis.call('SADD', KEYS[5], ARGV[i]) end
for i = 8 + 2 * n, 7 + 2 * n + m do redis.call('RPUSH', KEYS[4], ARGV[i]) end
for i = 8 + 2 * n + m, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
refresh()
return {'ok'}
"""
# ARGV[4] token, [5] channel, [6] session id.
ATTACH = """
local gone = absent() if gone then return gone end
local old = redis.call('HMGET', KEYS[1], 'holder', 'channel')
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'holder', ARGV[4], 'channel', ARGV[5])
refresh()
if old[1] and old[2] then redis.call('PUBLISH', old[2], 'taken ' .. epoch .. ' ' .. ARGV[6]) end
return {'ok', epoch}
"""
# ARGV[4] epoch, [5] token.
DETACH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'ok', 0} end
local current = held()
if current[1] ~= ARGV[4] or current[2] ~= ARGV[5] then return {'ok', 0} end
redis.call('HDEL', KEYS[1], 'holder', 'channel')
refresh()
return {'ok', 1}
"""
# ARGV[4] id prefix, [5] the message's JSON without its id (the id goes first).
APPEND_MESSAGE = """
local gone = absent() if gone then return gone end
local position = redis.call('HINCRBY', KEYS[1], 'message_count', 1)
local id = ARGV[4] .. '_' .. string.format('%03d', position)
while redis.call('SISMEMBER', KEYS[5], id) == 1 do
  position = position + 1
  id = ARGV[4] .. '_' .. string.format('%03d', position)
end
redis.call('SADD', KEYS[5], id)
redis.call('RPUSH', KEYS[2], '{"message_id":"' .. id .. '",' .. string.sub(ARGV[5], 2))
refresh()
local current = held()
return {'ok', current[1], current[2], id}
"""
# ARGV[4] modification.
APPEND_MODIFICATION = """
local gone = absent() if gone then return gone end
redis.call('RPUSH', KEYS[4], ARGV[4])
refresh()
local current = held()
return {'ok', current[1], current[2]}
"""
# ARGV[4..] field name/value pairs.
UPDATE_FIELDS = """
local gone = absent() if gone then return gone end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
refresh()
local current = held()
return {'ok', current[1], current[2]}
"""
TOUCH = """
local gone = absent() if gone then return gone end
refresh()
local current = held()
return {'ok', current[1], current[2]}
"""
# ARGV[4] event, [5] outbox limit, [6] sender epoch or '', [7] sender token or '', [8] session id.
ENQUEUE = """
local gone = absent() if gone then return gone end
local current = redis.call('HMGET', KEYS[1], 'epoch', 'holder', 'channel')
if current[1] == ARGV[6] and current[2] == ARGV[7] then return {'ok', 0} end
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[5]), -1)
redis.call('PEXPIRE', KEYS[3], redis.call('PTTL', KEYS[1]))
if current[2] and current[3] then
  redis.call('PUBLISH', current[3], 'events ' .. current[1] .. ' ' .. ARGV[8])
end
return {'ok', 1}
"""
# ARGV[4] epoch, [5] token.
DRAIN = """
local gone = absent() if gone then return gone end
local current = held()
if current[1] ~= ARGV[4] or current[2] ~= ARGV[5] then return {'taken'} end
local events = redis.call('LRANGE', KEYS[3], 0, -1)
redis.call('DEL', KEYS[3])
return {'ok', events}
"""
# ARGV[4] session id.
DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'ok'} end
local channel = redis.call('HGET', KEYS[1], 'channel')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[6], 'ended', 'PX', ARGV[2])
if channel then redis.call('PUBLISH', channel, 'gone 0 ' .. ARGV[4]) end
return {'ok'}
"""

NOT_FIELDS = frozenset({"modifications", "last_activity"})


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


class RedisSessionStore(SessionStore):
    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        resume_window: float,
        tombstone_ttl: float | None = None,
        outbox_limit: int = DEFAULT_OUTBOX_LIMIT,
        key_prefix: str = DEFAULT_PREFIX,
        timeout: float = 2.0,
    ) -> None:
        super().__init__(resume_window=resume_window, tombstone_ttl=tombstone_ttl, outbox_limit=outbox_limit)
        self.key_prefix = key_prefix
        self.channel = f"{key_prefix}signal:{uuid.uuid4().hex}"
        self._redis: Redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        )
        kwargs = self._redis.connection_pool.connection_kwargs
        # Where the store is, for error messages: never the URL, which may carry a password.
        self.where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        self._scripts: dict[str, AsyncScript] = {
            name: self._redis.register_script(PRELUDE + body)
            for name, body in {
                "create": CREATE,
                "attach": ATTACH,
                "detach": DETACH,
                "append_message": APPEND_MESSAGE,
                "append_modification": APPEND_MODIFICATION,
                "update_fields": UPDATE_FIELDS,
                "touch": TOUCH,
                "enqueue": ENQUEUE,
                "drain": DRAIN,
                "delete": DELETE,
            }.items()
        }
        self._listener: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as error:
            raise self._unavailable(error) from None
        self._listener = asyncio.create_task(self._listen(), name="session-store-signals")

    async def close(self) -> None:
        if self._listener is not None:
            # redis-py can swallow a cancellation that lands while it connects (redis/redis-py#2028):
            # cancel again until the listener is really gone.
            while not self._listener.done():
                self._listener.cancel()
                await asyncio.wait([self._listener], timeout=0.1)
            self._listener = None
        await self._redis.aclose()

    def _unavailable(self, error: RedisError) -> StoreUnavailable:
        return StoreUnavailable(f"Redis session store at {self.where} unavailable: {type(error).__name__}: {error}")

    # -- plumbing ---------------------------------------------------------------------------------

    def _keys(self, session_id: str) -> list[str]:
        return [f"{self.key_prefix}{{{session_id}}}:{part}" for part in PARTS]

    async def _script(self, name: str, session_id: str, *args: str | int | float) -> list[Any]:
        window = round(self.resume_window * 1000)
        tombstone = round(self.tombstone_ttl * 1000)
        try:
            reply: list[Any] = await self._scripts[name](
                keys=self._keys(session_id), args=[window, tombstone, repr(time.time()), *args]
            )
        except RedisError as error:
            raise self._unavailable(error) from None
        status = reply[0]
        if status == "missing":
            raise SessionNotFound(session_id)
        if status in ("expired", "ended"):
            raise SessionExpired(session_id, status)
        return reply

    # -- sessions ---------------------------------------------------------------------------------

    @timed("create")
    async def create(self, state: SessionState, token: str) -> Attachment:
        fields = state.fields_dict()
        pairs = [
            item for name, value in fields.items() if name not in NOT_FIELDS for item in (f"f:{name}", _json(value))
        ]
        reply = await self._script(
            "create",
            state.session_id,
            token,
            self.channel,
            len(state.messages),
            len(state.modifications),
            *(_json(message.to_dict()) for message in state.messages),
            *(message.message_id for message in state.messages),
            *state.modifications,
            *pairs,
        )
        if reply[0] == "exists":
            raise ValueError(f"session {state.session_id} already exists")
        return self._hold(Attachment(state.session_id, token, 1))

    @timed("load")
    async def load(self, session_id: str) -> SessionState:
        state, messages, _, modifications, _, mark = self._keys(session_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(state)
                pipe.lrange(messages, 0, -1)
                pipe.lrange(modifications, 0, -1)
                pipe.get(mark)
                found, message_items, modification_items, marked = await pipe.execute()
        except RedisError as error:
            raise self._unavailable(error) from None
        if not found:
            if marked == "ended":
                raise SessionExpired(session_id, "ended")
            if marked is not None:
                raise SessionExpired(session_id, "expired")
            raise SessionNotFound(session_id)
        data = {name[2:]: orjson.loads(value) for name, value in found.items() if name.startswith("f:")}
        data["last_activity"] = float(found["last_activity"])
        data["modifications"] = modification_items
        data["messages"] = [orjson.loads(item) for item in message_items]
        return SessionState.from_dict(data)

    @timed("append_message")
    async def append_message(self, session_id: str, *, sender: str, content: str, origin: Origin) -> StoredMessage:
        now = time.time()
        body = _json({"sender": sender, "content": content, "origin": origin, "created_at": now})
        reply = await self._session_write("append_message", session_id, ID_PREFIX[origin], body)
        return StoredMessage(reply[3], sender, content, origin, now)

    async def _session_write(self, name: str, session_id: str, *args: str) -> list[Any]:
        held = list(self._held.get(session_id, []))
        reply = await self._script(name, session_id, *args)
        self._observe(held, int(reply[1]), reply[2], False)
        return reply

    @timed("append_modification")
    async def append_modification(self, session_id: str, modification: str) -> None:
        await self._session_write("append_modification", session_id, modification)

    @timed("update_fields")
    async def update_fields(self, session_id: str, /, **changes: Any) -> None:
        check_updatable(changes)
        pairs = [item for name, value in changes.items() for item in (f"f:{name}", _json(value))]
        await self._session_write("update_fields", session_id, *pairs)

    @timed("touch")
    async def touch(self, session_id: str) -> None:
        await self._session_write("touch", session_id)

    @timed("delete")
    async def delete(self, session_id: str) -> None:
        await self._script("delete", session_id, session_id)
        self._observe(self._held.get(session_id, []), None, None, False)

    # -- attachment -----------------------------------------------------------------------------

    @timed("attach")
    async def attach(self, session_id: str, token: str) -> Attachment:
        reply = await self._script("attach", session_id, token, self.channel, session_id)
        epoch = int(reply[1])
        self._observe(self._held.get(session_id, []), epoch, token, False)
        return self._hold(Attachment(session_id, token, epoch))

    @timed("is_attached")
    async def is_attached(self, attachment: Attachment) -> bool:
        try:
            epoch, holder = await self._redis.hmget(self._keys(attachment.session_id)[0], ["epoch", "holder"])
        except RedisError as error:
            raise self._unavailable(error) from None
        self._observe(
            [attachment], None if epoch is None else int(epoch), None if holder is None else str(holder), False
        )
        return not attachment.taken_over.is_set()

    @timed("detach")
    async def detach(self, attachment: Attachment) -> bool:
        self._release(attachment)
        reply = await self._script("detach", attachment.session_id, attachment.epoch, attachment.token)
        return bool(reply[1])

    # -- events for a detached client -------------------------------------------------------------

    @timed("deliver")
    async def deliver(self, attachment: Attachment, event: Event) -> bool:
        return not await self._enqueue(attachment.session_id, event, attachment)

    @timed("enqueue_event")
    async def enqueue_event(self, session_id: str, event: Event) -> None:
        await self._enqueue(session_id, event, None)

    async def _enqueue(self, session_id: str, event: Event, sender: Attachment | None) -> bool:
        reply = await self._script(
            "enqueue",
            session_id,
            _json(event),
            self.outbox_limit,
            "" if sender is None else sender.epoch,
            "" if sender is None else sender.token,
            session_id,
        )
        return bool(reply[1])

    @timed("drain_events")
    async def drain_events(self, attachment: Attachment) -> list[Event]:
        attachment.events_waiting.clear()
        reply = await self._script("drain", attachment.session_id, attachment.epoch, attachment.token)
        if reply[0] == "taken":
            self._lost(attachment)
            raise SessionTakenOver(attachment.session_id, attachment.epoch)
        return [orjson.loads(event) for event in reply[1]]

    # -- signals ----------------------------------------------------------------------------------

    async def _listen(self) -> None:
        # A fresh subscription after any failure: a broken PubSub connection can keep looking connected.
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self._dispatch(pubsub)
            except RedisError as error:
                log.warning("session store signals interrupted", extra={"error": str(self._unavailable(error))})
            finally:
                with contextlib.suppress(RedisError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    async def _dispatch(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            if message["type"] == "subscribe":
                await self._check_held()
            elif message["type"] == "message":
                self._signalled(message["data"])

    def _signalled(self, data: str) -> None:
        kind, epoch_text, session_id = data.split(" ", 2)
        epoch = int(epoch_text)
        for attachment in list(self._held.get(session_id, ())):
            if kind == "gone" or (kind == "taken" and attachment.epoch < epoch):
                self._lost(attachment)
            elif kind == "events" and attachment.epoch == epoch:
                attachment.events_waiting.set()

    async def _check_held(self) -> None:
        """After (re)subscribing: what was published while the subscription was down is asked for instead."""
        held = self._held_now()
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id in held:
                state, _, outbox, _, _, _ = self._keys(session_id)
                pipe.hmget(state, ["epoch", "holder"])
                pipe.llen(outbox)
            replies = await pipe.execute()
        for index, (_, attachments) in enumerate(held.items()):
            (epoch, holder), queued = replies[2 * index], replies[2 * index + 1]
            self._observe(attachments, None if epoch is None else int(epoch), holder, bool(queued))
