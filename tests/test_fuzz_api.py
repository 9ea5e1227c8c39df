"""Fuzz every route of the OpenAPI schema with schemathesis against a real server: no 5xx, no hang.

Examples per route: SINKSERVE_FUZZ_EXAMPLES (default 50 in CI; raise it for a longer run). The
server runs with a short context and a 2-second request deadline so that a generated
`max_tokens` or `n` cannot make one example slow.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.server_process import ServerProcess  # noqa: E402

EXAMPLES = int(os.environ.get("SINKSERVE_FUZZ_EXAMPLES", "50"))


@pytest.fixture(scope="module")
def api_schema():
    with ServerProcess("--max-model-len", "64", "--request-timeout", "2", "--max-num-seqs", "64") as server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


STATUSES: Counter = Counter()


def check_response(case) -> None:
    response = case.call(timeout=30)
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    content_type = response.headers.get("content-type") or [""]  # schemathesis: a list per header
    if response.status_code >= 400 and content_type[0].startswith("application/json"):
        error = response.json().get("error")
        assert error is not None and {"message", "type", "param", "code"} <= set(error), response.text[:500]


def test_no_server_errors(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8  # every route of the server is in the schema
    for operation in operations:
        run = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                       suppress_health_check=list(HealthCheck))(given(case=operation.as_strategy())(check_response))
        run()
    print(f"\nfuzzed {len(operations)} operations, {sum(STATUSES.values())} requests, statuses {dict(STATUSES)}")
    assert sum(STATUSES.values()) >= len(operations) * min(EXAMPLES, 5)
