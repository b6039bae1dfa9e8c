"""The session store: conversations as data that outlive connections, worker processes and machines.

`build_session_store(settings)` gives the configured backend (SQLite in STATE_DIR, or Redis at
SESSION_STORE_URL); both honour the contract in `interface.SessionStore`.
"""

from server.store.errors import (
    SessionExpired,
    SessionNotFound,
    SessionTakenOver,
    StoreError,
    StoreUnavailable,
)
from server.store.factory import build_session_store
from server.store.interface import SessionStore
from server.store.model import Attachment, Event, Origin, SessionState, StoredMessage

__all__ = [
    "Attachment",
    "Event",
    "Origin",
    "SessionExpired",
    "SessionNotFound",
    "SessionState",
    "SessionStore",
    "SessionTakenOver",
    "StoreError",
    "StoreUnavailable",
    "StoredMessage",
    "build_session_store",
]
