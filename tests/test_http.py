"""The HTTP endpoints of PROTOCOL.md: exact shapes of `/` and `/conversation/health`, and the API docs."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import orjson

from harness.server import ServerProcess, http_get
from tests.conftest import running_server

SERVICE_PARTS = {"session_manager", "stt_service", "llm_service", "request_manager", "websocket_handler"}
PART_STATES = {"healthy", "degraded", "unavailable"}


def get_json(server: ServerProcess, path: str) -> dict[str, Any]:
    status, body = http_get(server.base_url + path)
    assert status == 200, body
    data: dict[str, Any] = orjson.loads(body)
    return data


def test_liveness_has_exactly_the_documented_fields(server: ServerProcess) -> None:
    body = get_json(server, "/")
    assert set(body) == {"status", "timestamp", "service", "version", "description", "timezone"}
    assert body["status"] == "healthy"
    assert body["service"] == "AI对话应用后端总服务"
    assert body["version"] == "1.0.0"
    assert body["description"] == "后端进程运行正常，各服务状态良好"
    assert isinstance(body["timestamp"], str)
    stamp = datetime.fromisoformat(body["timestamp"])
    assert stamp.tzinfo is not None, "ISO 8601 with an offset"
    assert abs(stamp.timestamp() - time.time()) < 300


def test_liveness_body_is_utf8_json_with_chinese_unescaped(server: ServerProcess) -> None:
    status, body = http_get(server.base_url + "/")
    assert status == 200
    assert "AI对话应用后端总服务".encode() in body


def test_readiness_has_the_documented_shape_and_unix_timestamp(server: ServerProcess) -> None:
    body = get_json(server, "/conversation/health")
    assert {"status", "timestamp", "service", "version", "services"} <= set(body)
    assert body["status"] == "healthy"
    assert body["service"] == "对话服务"
    assert body["version"] == "1.0.0"
    assert isinstance(body["timestamp"], float)
    assert abs(body["timestamp"] - time.time()) < 300
    assert set(body["services"]) == SERVICE_PARTS
    assert set(body["services"].values()) <= PART_STATES
    assert all(state == "healthy" for state in body["services"].values()), body


def test_readiness_names_the_mock_engines_without_any_key(server: ServerProcess) -> None:
    body = get_json(server, "/conversation/health")
    assert body["engines"]["stt"]["mode"] == "mock"
    assert body["engines"]["llm"]["mode"] == "mock"
    text = orjson.dumps(body).decode().lower()
    assert "api_key" not in text
    assert "sk-" not in text


def test_api_docs_are_served_with_an_openapi_document_of_both_endpoints(server: ServerProcess) -> None:
    status, page = http_get(server.base_url + "/docs")
    assert status == 200
    assert b"<html" in page.lower()
    spec = get_json(server, "/docs/openapi.json")
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["version"] == "1.0.0"
    assert {"/", "/conversation/health"} <= set(spec["paths"])
    assert "get" in spec["paths"]["/"]
    assert "get" in spec["paths"]["/conversation/health"]


def test_an_unknown_path_is_not_found(server: ServerProcess) -> None:
    status, _ = http_get(server.base_url + "/no/such/endpoint")
    assert status == 404


def test_both_health_responses_name_the_server_time_zone(server: ServerProcess) -> None:
    for path in ("/", "/conversation/health"):
        timezone = get_json(server, path)["timezone"]
        assert isinstance(timezone, str) and timezone, path
    with running_server(TZ="Asia/Shanghai") as shanghai:
        assert get_json(shanghai, "/")["timezone"] == "Asia/Shanghai"
        assert get_json(shanghai, "/conversation/health")["timezone"] == "Asia/Shanghai"
