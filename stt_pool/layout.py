"""The pool's files under the runtime directory (tmpfs): one place names them all.

`pool.status` is the shared status table, `decoder-<n>.sock` the listening socket of decoder
slot n, and `pcm/<stream id>.pcm` the shared-memory buffer of one recording. It also holds the
name of the pool's process, which the server needs without importing the decoding side.
"""

from __future__ import annotations

from pathlib import Path

# The name the pool process is registered under with Sanic's worker manager (Sanic calls it
# "Sanic-<name>-<n>"); /metrics recognises the process by it.
POOL_PROCESS_NAME = "STTPool"


def status_path(runtime_dir: Path) -> Path:
    return runtime_dir / "pool.status"


def socket_path(runtime_dir: Path, index: int) -> Path:
    return runtime_dir / f"decoder-{index}.sock"


def buffer_dir(runtime_dir: Path) -> Path:
    return runtime_dir / "pcm"


def buffer_path(runtime_dir: Path, stream_id: str) -> Path:
    return buffer_dir(runtime_dir) / f"{stream_id}.pcm"
