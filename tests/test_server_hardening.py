"""Request ids, structured logs, API keys from a file, and a bounded waiting queue (real server)."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from tests.server_process import ServerProcess

KEY = "sk-from-file"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# sinkserve keys\n\n{KEY}\n")
    args = ("--api-key-file", str(key_file), "--max-num-seqs", "1", "--max-waiting-requests", "2",
            "--log-format", "json", "--log-level", "info")
    with ServerProcess(*args) as proc:
        yield proc


def _post(server, body, request_id=None, key=KEY, path="/v1/completions"):
    headers = {"Authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def test_request_ids_on_every_response_and_in_the_logs(server):
    ok = _post(server, {"prompt": "Once", "max_tokens": 2}, request_id="client-id-1")
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-id-1"
    fresh = _post(server, {"prompt": "Once", "max_tokens": 2}, request_id="bad id\twith spaces")
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    denied = _post(server, {"prompt": "Once"}, key="wrong")
    assert denied.status_code == 401 and re.fullmatch(r"[0-9a-f]{32}", denied.headers["x-request-id"])
    assert KEY not in server.log()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        access = [e for e in entries if e["logger"] == "sinkserve.access" and e["request_id"] == "client-id-1"]
        if access:
            break
        time.sleep(0.2)
    assert access and access[0]["path"] == "/v1/completions" and access[0]["status"] == 200


def test_a_full_waiting_queue_gets_a_fast_503_and_admitted_requests_finish(server):
    results: dict[str, httpx.Response] = {}

    def send(name, max_tokens):
        results[name] = _post(server, {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True})

    # One running request (max_num_seqs 1) keeps the next two waiting.
    threads = [threading.Thread(target=send, args=("running", 400))]
    threads[0].start()
    deadline = time.monotonic() + 60
    while server.metric("sinkserve_num_requests_running") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    for name in ("waiting-1", "waiting-2"):
        threads.append(threading.Thread(target=send, args=(name, 4)))
        threads[-1].start()
    while server.metric("sinkserve_num_requests_waiting") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("sinkserve_num_requests_waiting") == 2
    refused = _post(server, {"prompt": "Once", "max_tokens": 4})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    chat = _post(server, {"messages": [{"role": "user", "content": "hi"}]}, path="/v1/chat/completions")
    assert chat.status_code == 503
    for thread in threads:
        thread.join(120)
    assert {name: r.status_code for name, r in results.items()} == {"running": 200, "waiting-1": 200,
                                                                   "waiting-2": 200}
    assert results["running"].json()["usage"]["completion_tokens"] == 400
    assert server.metric("sinkserve_requests_rejected_total") == 2
    assert server.metric("sinkserve_kv_blocks_used") == 0
