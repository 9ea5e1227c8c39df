"""docker/nginx.conf in front of two real replicas: sessions stick to the replica holding
their KV cache, other requests spread, streams pass through unbuffered.

Runs the repository's nginx.conf, with the compose service names replaced by the two loopback
replicas; skipped when nginx is not installed (`apt-get install nginx-light`; .ci/run does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.server_process import REPO_ROOT, ServerProcess, free_port

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nginx")
    with ServerProcess() as one, ServerProcess() as two:
        port = free_port()
        conf = (REPO_ROOT / "docker" / "nginx.conf").read_text()
        conf = (conf.replace("sinkserve-1:8000", f"127.0.0.1:{one.port}")
                    .replace("sinkserve-2:8000", f"127.0.0.1:{two.port}")
                    .replace("listen 8000;", f"listen 127.0.0.1:{port};")
                    .replace("http {", f"http {{\n    access_log off;\n    client_body_temp_path {tmp}/body;"
                                       f"\n    proxy_temp_path {tmp}/proxy;", 1))
        assert f"127.0.0.1:{one.port}" in conf and f"127.0.0.1:{two.port}" in conf
        (tmp / "nginx.conf").write_text(conf)
        nginx = subprocess.Popen(
            [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
             "-g", f"daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            else:
                raise RuntimeError((tmp / "error.log").read_text() if (tmp / "error.log").exists() else "no nginx")
            yield url, (one, two)
        finally:
            nginx.terminate()
            nginx.wait(10)


def _prompt_tokens(replica: ServerProcess) -> float:
    return replica.metric("sinkserve_prompt_tokens_total")


def test_each_session_returns_to_the_replica_holding_its_cache(cluster):
    url, replicas = cluster
    sessions = [f"session-{i}" for i in range(16)]
    for session in sessions:
        prompt = f"{session}: Once upon a time, there was a"
        headers = {"X-Session-ID": session}
        for turn in range(3):
            response = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                                  json={"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
            assert response.status_code == 200, response.text
            body = response.json()
            cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
            if turn:  # only the replica that served the earlier turns has these tokens
                assert cached > 0, (session, turn)
            prompt += body["choices"][0]["text"] + " Then"
    held = [replica.metric("sinkserve_sessions_active") for replica in replicas]
    assert sum(held) == len(sessions)
    assert all(h > 0 for h in held), held  # 16 sessions hashed over 2 replicas: both hold some


def test_requests_without_a_session_spread_over_the_replicas(cluster):
    url, replicas = cluster
    before = [_prompt_tokens(r) for r in replicas]
    for _ in range(24):
        response = httpx.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 1}, timeout=60)
        assert response.status_code == 200
    gained = [_prompt_tokens(r) - b for r, b in zip(replicas, before)]
    assert sum(gained) == 24 * 2  # BOS + "Once" each
    assert all(g > 0 for g in gained), gained


def test_streams_pass_through_the_balancer_event_by_event(cluster):
    url, _ = cluster
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, headers={"X-Session-ID": "stream"},
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "stream": True,
                            "temperature": 0, "ignore_eos": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("x-request-id")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) >= 8
