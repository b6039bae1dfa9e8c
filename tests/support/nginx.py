"""Run the shipped nginx site in a throw-away prefix: `nginx -t`, or a real nginx on loopback ports."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from harness.server import free_port
from tests.support.deploy import NGINX_SITE

TLS_MARKER = "# TLS variant"


def plain_site() -> str:
    """The site as shipped (the TLS variant is a comment)."""
    return NGINX_SITE.read_text()


def tls_site() -> str:
    """The shared `map`/`upstream` part plus the commented TLS server blocks, uncommented."""
    text = NGINX_SITE.read_text()
    shared = text[: text.index("\nserver {")]
    commented = text[text.index(TLS_MARKER) :].splitlines()[1:]
    block = [re.sub(r"^# ?", "", line) for line in commented if line.startswith("#")]
    start = next(i for i, line in enumerate(block) if line.startswith("server {"))
    return shared + "\n" + "\n".join(block[start:]) + "\n"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class Nginx:
    """A prefix directory with an nginx.conf that includes `site` (ports and upstream rewritten for tests)."""

    def __init__(self, prefix: Path, site: str, backend_port: int | Sequence[int] = 8000) -> None:
        self.prefix = prefix
        self.http_port = free_port()
        self.https_port = free_port()
        # Several ports: the upstream gets one `server` line each, as a site balancing instances would.
        ports = [backend_port] if isinstance(backend_port, int) else list(backend_port)
        upstreams = "\n    ".join(f"server 127.0.0.1:{port};" for port in ports)
        site = site.replace("server 127.0.0.1:8000;", upstreams)
        site = re.sub(r"listen \[::\]:\d+[^;]*;\n", "", site)
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.http_port};")
        site = site.replace("listen 443 ssl", f"listen 127.0.0.1:{self.https_port} ssl")
        self.site = site
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "site.conf").write_text(site)
        temp = prefix / "temp"
        temp.mkdir(exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(
            f"""pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
worker_processes 1;
events {{ worker_connections 512; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {prefix}/site.conf;
}}
"""
        )
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        return ["nginx", "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.prefix / "error.log"), *args]

    def test_config(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command("-t"), capture_output=True, text=True, check=False)

    def __enter__(self) -> Nginx:
        self.process = subprocess.Popen(
            self.command("-g", "daemon off;"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode() if self.process.stdout else ""
                raise RuntimeError(f"nginx exited with {self.process.returncode}: {output}")
            try:
                socket.create_connection(("127.0.0.1", self.http_port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("nginx did not start listening")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
