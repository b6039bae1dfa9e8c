"""Helpers for the deployment tests: run install.sh, fingerprint staged trees, serve model archives."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import ssl
import stat
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SH = ROOT / "install.sh"
UNIT_NAME = "ai-dialogue-backend.service"
UNIT_SOURCE = ROOT / "service" / UNIT_NAME
NGINX_SITE = ROOT / "service" / "nginx" / "ai-dialogue-backend.conf"

# Where a default installation puts things, relative to the (staging) root.
INSTALL_DIR = "opt/ai-dialogue-backend"
UNIT_PATH = f"etc/systemd/system/{UNIT_NAME}"
WANTS_LINK = f"etc/systemd/system/multi-user.target.wants/{UNIT_NAME}"
ENV_PATH = "etc/ai-dialogue-backend/env"
STATE_DIR = "var/lib/ai-dialogue-backend"
LOG_DIR = "var/log/ai-dialogue-backend"
MODEL_DIR = f"{INSTALL_DIR}/model/vosk-model"

# Files of a minimal directory with the layout of a Vosk model (install.sh checks the layout only).
FAKE_MODEL_FILES = {
    "am/final.mdl": b"acoustic model bytes\x00\x01\x02",
    "conf/mfcc.conf": b"--use-energy=false\n--sample-frequency=16000\n",
    "conf/model.conf": b"--min-active=200\n",
    "graph/HCLr.fst": b"graph bytes",
    "graph/phones/word_boundary.int": b"1 nonword\n",
    "README": b"fake model for the installer tests\n",
}


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given in the unit (systemd allows repeated keys)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def run_install(
    *args: str, env: dict[str, str] | None = None, script: Path = INSTALL_SH
) -> subprocess.CompletedProcess[str]:
    """Run install.sh with `args`; never raises on a non-zero exit (tests assert on it)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=full_env, timeout=600, check=False
    )


def stage(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`install.sh --root ROOT --no-venv ARGS` that must succeed."""
    result = run_install("--root", str(root), "--no-venv", *args, env=env)
    assert result.returncode == 0, f"install.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def tree_snapshot(root: Path) -> dict[str, tuple[str, ...]]:
    """Every entry below `root`: type, mode, owner and a content hash (or link target)."""
    snapshot: dict[str, tuple[str, ...]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        relative = str(path.relative_to(root))
        mode = oct(stat.S_IMODE(info.st_mode))
        if stat.S_ISLNK(info.st_mode):
            snapshot[relative] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            snapshot[relative] = ("dir", mode, str(info.st_uid))
        else:
            snapshot[relative] = ("file", mode, str(info.st_uid), sha256_of(path))
    return snapshot


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def make_fake_model(directory: Path) -> Path:
    for name, content in FAKE_MODEL_FILES.items():
        file = directory / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(content)
    return directory


def zip_model(model_dir: Path, archive: Path, top: str = "vosk-model-test-0.1") -> Path:
    """A zip like the official ones: every file inside one top-level folder."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(model_dir.rglob("*")):
            if file.is_file():
                zf.write(file, f"{top}/{file.relative_to(model_dir)}")
    return archive


def tar_model(model_dir: Path, archive: Path, top: str = "vosk-model-test-0.1") -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(model_dir, arcname=top)
    return archive


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    redirect_base: str | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.redirect_base is None:
            super().do_GET()
            return
        self.send_response(302)
        self.send_header("Location", self.redirect_base + self.path)
        self.end_headers()


@contextmanager
def serve_directory(
    directory: Path, certificate: tuple[Path, Path] | None = None, redirect_to: str | None = None
) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 from a thread; yields the base URL.

    With `certificate` (cert, key) over https; with `redirect_to` every GET is a 302 to that base URL.
    """
    handler_class = type("Handler", (_QuietHandler,), {"redirect_base": redirect_to})
    handler = functools.partial(handler_class, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    scheme = "http"
    if certificate is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certificate)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
