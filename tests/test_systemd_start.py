"""The shipped unit starts the real server as systemd would run it (there is no systemd PID 1 here).

Everything comes from service/ai-dialogue-backend.service itself, so the test breaks when the unit
and the code drift apart: the `User`/`Group` (created with `useradd --system`, as install.sh does),
the `RuntimeDirectory`/`StateDirectory`/`LogsDirectory` created beforehand under root-owned /run,
/var/lib and /var/log with the unit's modes and owner, the `UMask`, the `Environment=` lines and
the `EnvironmentFile=` (the one install.sh writes, plus a free PORT, as an operator sets it), the
`WorkingDirectory` and `ExecStart`, and the process dropped to that user with setpriv.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil
import pytest

from harness.server import free_port, http_get
from tests.support.deploy import UNIT_SOURCE, stage, unit_settings

# Where systemd creates the directories named by RuntimeDirectory=, StateDirectory= and LogsDirectory=.
DIRECTORY_BASES = {
    "RuntimeDirectory": Path("/run"),
    "StateDirectory": Path("/var/lib"),
    "LogsDirectory": Path("/var/log"),
}
# systemd's environment for services before Environment= and EnvironmentFile= are applied.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments and blank lines skipped)."""
    entries = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip().strip('"')
    return entries


@dataclass
class SystemdLikeRun:
    """What systemd prepares before ExecStart, undone afterwards."""

    unit: dict[str, list[str]]
    user: str = ""
    created_user: bool = False
    directories: dict[str, Path] = field(default_factory=dict)
    acl_grants: list[Path] = field(default_factory=list)

    def single(self, key: str) -> str:
        values = self.unit[key]
        assert len(values) == 1, (key, values)
        return values[0]

    def create_user(self) -> None:
        self.user = self.single("User")
        assert self.single("Group") == self.user, "install.sh creates the user with its own group"
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            home = DIRECTORY_BASES["StateDirectory"] / self.single("StateDirectory")
            subprocess.run(
                [
                    *("useradd", "--system", "--user-group", "--home-dir", str(home), "--no-create-home"),
                    *("--shell", "/usr/sbin/nologin", self.user),
                ],
                check=True,
            )
            self.created_user = True

    def create_directories(self) -> None:
        account = pwd.getpwnam(self.user)
        for key, base in DIRECTORY_BASES.items():
            path = base / self.single(key)
            assert base.stat().st_uid == 0, f"{base} is root's, as on a real system"
            assert not path.exists(), f"{path} already exists: is the service installed here? (not touching it)"
            path.mkdir()
            self.directories[key] = path
            os.chown(path, account.pw_uid, account.pw_gid)
            path.chmod(int(self.single(f"{key}Mode"), 8))

    def grant_traversal(self, *paths: Path) -> None:
        """The test's interpreter may live below a private directory (/root); a deployment's does not."""
        for path in paths:
            for directory in [*reversed(path.parents), path]:
                if directory.is_dir() and not self.user_can("test", "-x", str(directory)):
                    subprocess.run(["setfacl", "-m", f"u:{self.user}:x", str(directory)], check=True)
                    self.acl_grants.append(directory)

    def user_can(self, *command: str) -> bool:
        return subprocess.run(self.as_user(*command), capture_output=True, check=False).returncode == 0

    def as_user(self, *command: str) -> list[str]:
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", "--no-new-privs", *command]

    def undo(self) -> None:
        for directory in self.acl_grants:
            subprocess.run(["setfacl", "-x", f"u:{self.user}", str(directory)], check=False)
        for path in self.directories.values():
            shutil.rmtree(path, ignore_errors=True)
        if self.created_user:
            subprocess.run(["userdel", self.user], check=False)


@pytest.fixture
def systemd_like() -> Iterator[SystemdLikeRun]:
    if os.geteuid() != 0:
        pytest.fail("this test creates a system user and directories in /run, /var/lib and /var/log: run it as root")
    run = SystemdLikeRun(unit_settings(UNIT_SOURCE.read_text()))
    try:
        yield run
    finally:
        run.undo()


@pytest.fixture
def staged_root() -> Iterator[Path]:
    """install.sh's staged installation, in a directory the service user can enter (pytest's tmp is root's)."""
    root = Path(tempfile.mkdtemp(prefix="adb-systemd-"))
    root.chmod(0o755)
    try:
        stage(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_unit_starts_the_server_as_its_user_with_its_directories_and_environment(
    systemd_like: SystemdLikeRun, staged_root: Path
) -> None:
    unit = systemd_like
    unit.create_user()
    unit.create_directories()

    environment = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
    # systemd exports the directories it created for the unit (the session store uses STATE_DIRECTORY).
    for key in DIRECTORY_BASES:
        environment[key.removesuffix("Directory").upper() + "_DIRECTORY"] = str(unit.directories[key])
    for line in unit.unit["Environment"]:
        environment.update(assignment.split("=", 1) for assignment in shlex.split(line))
    env_file = staged_root / unit.single("EnvironmentFile").lstrip("/")
    port = free_port()
    env_file.write_text(env_file.read_text() + f"PORT={port}\n")
    environment.update(parse_env_file(env_file.read_text()))
    assert environment["PORT"] == str(port), "the env file overrides the unit's Environment="

    # The unit's paths and its directories must agree, or the service writes where it may not.
    assert Path(environment["RUNTIME_DIR"]) == unit.directories["RuntimeDirectory"]
    assert Path(environment["LOG_FILE"]).parent == unit.directories["LogsDirectory"]
    assert Path(environment["HOME"]) == unit.directories["StateDirectory"]

    working_dir = Path(unit.single("WorkingDirectory"))
    executable, *arguments = shlex.split(unit.single("ExecStart"))
    assert executable == f"{working_dir}/.venv/bin/python", "ExecStart runs the install's virtualenv"
    code_dir = staged_root / working_dir.relative_to("/")
    assert (code_dir / "server" / "__main__.py").is_file()
    # The staged installation has no virtualenv (--no-venv): the test's interpreter stands in for it.
    unit.grant_traversal(Path(sys.executable).resolve(), Path(sys.prefix), code_dir)

    log = staged_root / "service.log"
    with log.open("wb") as output:
        service = subprocess.Popen(
            unit.as_user(sys.executable, *arguments),
            cwd=code_dir,
            env=environment,
            umask=int(unit.single("UMask"), 8),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        health = wait_for_health(service, port, log)
        assert health["status"] == "healthy"
        account = pwd.getpwnam(unit.user)
        processes = [psutil.Process(service.pid), *psutil.Process(service.pid).children(recursive=True)]
        assert {process.uids().effective for process in processes} == {account.pw_uid}
        runtime = unit.directories["RuntimeDirectory"]
        assert (runtime / "metrics").is_dir()
        assert (runtime / "metrics").stat().st_uid == account.pw_uid
        log_file = Path(environment["LOG_FILE"])
        assert log_file.stat().st_uid == account.pw_uid
        assert log_file.stat().st_mode & 0o007 == 0, "UMask=0027: the log is not world-readable"
        sessions = unit.directories["StateDirectory"] / "sessions.sqlite3"
        assert sessions.stat().st_uid == account.pw_uid and sessions.stat().st_mode & 0o077 == 0

        service.send_signal(getattr(signal, unit.single("KillSignal")))
        assert service.wait(int(unit.single("TimeoutStopSec"))) == 0, log.read_text()
        assert runtime.is_dir(), "the RuntimeDirectory is systemd's to remove"
        assert list(runtime.iterdir()) == [], "the service leaves it empty"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGKILL)
        service.wait()


def test_a_second_start_empties_what_the_first_left_in_the_runtime_directory(
    systemd_like: SystemdLikeRun, staged_root: Path
) -> None:
    """systemd keeps RuntimeDirectory between restarts with RuntimeDirectoryPreserve=; a crash leaves files."""
    unit = systemd_like
    unit.create_user()
    unit.create_directories()
    runtime = unit.directories["RuntimeDirectory"]
    account = pwd.getpwnam(unit.user)
    for stale in (runtime / "decoder-0.sock", runtime / "metrics" / "counter_123.db"):
        stale.parent.mkdir(exist_ok=True)
        stale.write_bytes(b"left by a killed run")
        os.chown(stale, account.pw_uid, account.pw_gid)
        os.chown(stale.parent, account.pw_uid, account.pw_gid)
    code_dir = staged_root / Path(unit.single("WorkingDirectory")).relative_to("/")
    unit.grant_traversal(Path(sys.executable).resolve(), Path(sys.prefix), code_dir)
    script = (
        "from config import load_settings; from server.__main__ import prepare_runtime_dir; "
        "prepare_runtime_dir(load_settings())"
    )
    result = subprocess.run(
        unit.as_user(sys.executable, "-c", script),
        cwd=code_dir,
        env={"PATH": SYSTEMD_PATH, "ENV_FILE": os.devnull, "RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in runtime.rglob("*")) == ["metrics"]
    assert oct(runtime.stat().st_mode & 0o777) == oct(int(unit.single("RuntimeDirectoryMode"), 8))


def wait_for_health(service: subprocess.Popen[bytes], port: int, log: Path) -> dict[str, object]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if service.poll() is not None:
            pytest.fail(f"the service exited with {service.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(OSError):
            status, body = http_get(f"http://127.0.0.1:{port}/conversation/health", timeout=2)
            if status == 200:
                health: dict[str, object] = orjson.loads(body)
                return health
        time.sleep(0.2)
    pytest.fail(f"no answer from /conversation/health in 90 s:\n{log.read_text()[-4000:]}")
