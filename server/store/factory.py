"""Choose and open the session store from the settings: the one place that knows both backends."""

from __future__ import annotations

from config import Settings
from server.store.interface import SessionStore
from server.store.redis_store import RedisSessionStore
from server.store.sqlite_store import SqliteSessionStore


def build_session_store(settings: Settings) -> SessionStore:
    """Redis when SESSION_STORE_URL is set, else SQLite in STATE_DIR. Call `await store.start()` in each worker."""
    if settings.session_store_url is not None:
        return RedisSessionStore(
            settings.session_store_url.get_secret_value(), resume_window=settings.session_resume_window
        )
    return SqliteSessionStore(
        settings.state_dir, resume_window=settings.session_resume_window, fsync=settings.session_store_fsync
    )
