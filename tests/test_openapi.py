"""The HTTP API fuzzed from its own description, /openapi.json, with schemathesis: requests it
generates from the description, valid ones and not, on every operation of a real server that
asks for tokens. Never a 5xx; status codes, content types and bodies as the description says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from helpers import start_server
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from edge_llm.server import Server

TOKEN = "openapi-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def described(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tokens = tmp_path_factory.mktemp("openapi") / "tokens"
    tokens.write_text(f"fuzzer {TOKEN}\n")
    tokens.chmod(0o600)
    srv = start_server(tiny_model, max_tokens=8, default_max_tokens=4, auth_tokens=str(tokens))
    yield srv
    srv.stop(drain=0)


def test_the_api_does_what_its_description_says(described: Server) -> None:
    """Each operation in turn, its cases drawn by hypothesis from schemathesis' strategy (its
    pytest plugin does not run under pytest 9: pyproject turns it off)."""
    api = schemathesis.openapi.from_url(f"http://127.0.0.1:{described.http_port}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 11  # every route but the page's files and WebSocket
    for operation in operations:

        @given(operation.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers=AUTH,
                timeout=120,  # a hang guard, not a speed limit
                checks=[
                    not_a_server_error,
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ],
            )

        call()


def test_the_description_is_served_without_a_token(described: Server) -> None:
    response = httpx.get(f"http://127.0.0.1:{described.http_port}/openapi.json")
    assert response.status_code == 200 and response.json()["openapi"].startswith("3.1")
