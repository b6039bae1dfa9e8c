"""The store settings: which backend the service opens, where, for how long, and no password in errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config import ConfigError, load_settings
from server.store import build_session_store
from server.store.redis_store import RedisSessionStore
from server.store.sqlite_store import DATABASE_NAME, SqliteSessionStore

PASSWORD = "hunter2-not-shown"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STATE_DIR", "STATE_DIRECTORY", "SESSION_STORE_URL", "SESSION_RESUME_WINDOW", "SESSION_STORE_FSYNC"):
        monkeypatch.delenv(name, raising=False)


def test_the_default_is_sqlite_in_the_state_dir_for_a_day(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIR", str(tmp_path))

    store = build_session_store(load_settings(os.devnull))

    assert isinstance(store, SqliteSessionStore)
    assert store.path == tmp_path / DATABASE_NAME
    assert store.resume_window == 86400
    assert not store.fsync


def test_systemd_state_directory_is_the_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/a:{tmp_path}/b")

    assert load_settings(os.devnull).state_dir == tmp_path / "a"


def test_a_redis_url_selects_redis_and_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_STORE_URL", f"redis://:{PASSWORD}@db.internal:6380/2")
    monkeypatch.setenv("SESSION_RESUME_WINDOW", "600")

    settings = load_settings(os.devnull)
    store = build_session_store(settings)

    assert isinstance(store, RedisSessionStore)
    assert store.resume_window == 600
    assert store.where == "db.internal:6380"
    assert PASSWORD not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SESSION_STORE_URL", f"http://:{PASSWORD}@db.internal"),
        ("SESSION_RESUME_WINDOW", "0"),
        ("SESSION_RESUME_WINDOW", "soon"),
    ],
)
def test_a_bad_store_setting_names_itself_without_the_password(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError) as failure:
        load_settings(os.devnull)

    assert f"invalid setting {name}" in str(failure.value)
    assert PASSWORD not in str(failure.value)
