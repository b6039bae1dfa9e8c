"""`python -m server.store delete SESSION_ID...`: delete conversations from the configured store now.

For operators answering a deletion request: the same settings as the service (environment and
`.env`/ENV_FILE) choose the store, so it works for SQLite and Redis alike, while the service runs.
Each deleted session answers SESSION_EXPIRED from then on; with SQLite the freed pages are
overwritten and the WAL truncated before the command returns.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from config import ConfigError, load_settings
from server.store.errors import StoreUnavailable
from server.store.factory import build_session_store
from server.store.sqlite_store import SqliteSessionStore


async def delete(session_ids: list[str]) -> None:
    store = build_session_store(load_settings())
    await store.start()
    try:
        for session_id in session_ids:
            await store.delete(session_id)
            print(f"deleted {session_id}")
        if isinstance(store, SqliteSessionStore):
            await store.purge_expired()
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.store", description="Delete conversations now.")
    commands = parser.add_subparsers(dest="command", required=True)
    delete_command = commands.add_parser("delete", help="delete sessions and everything in them")
    delete_command.add_argument("session_ids", nargs="+", metavar="SESSION_ID")
    arguments = parser.parse_args(argv)
    try:
        asyncio.run(delete(arguments.session_ids))
    except (ConfigError, StoreUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
