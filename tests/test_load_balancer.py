"""docker/nginx.conf in front of two real replicas: sessions stick to the replica holding
their KV cache, other requests spread, streams pass through unbuffered, the client's request id
goes through, and Responses API chains are found on either replica (the replicas share the
default response store, an SQLite file) and go on after both restart; docker/compose.yaml's
balancer refuses to be published without an API key.

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
    shared = {"XDG_STATE_HOME": str(tmp / "state")}  # one response store file for both, as on one host
    replicas = [ServerProcess(env=shared), ServerProcess(env=shared)]  # a test may restart them
    one, two = replicas
    try:
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
            yield url, replicas
        finally:
            nginx.terminate()
            nginx.wait(10)
    finally:
        for replica in replicas:
            replica.stop()


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


def test_the_clients_request_id_goes_through(cluster):
    url, _ = cluster
    mine = httpx.post(url + "/v1/completions", headers={"X-Request-Id": "my-trace-42"}, timeout=60,
                      json={"prompt": "Once", "max_tokens": 1})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "my-trace-42"
    assert httpx.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 1},
                      timeout=60).headers["x-request-id"]  # nginx's own


def _chain(url: str, turns: int, previous: str | None = None) -> list[str]:
    """A Responses API chain of `turns` turns through the balancer, without a session header:
    each turn goes to whichever replica the balancer picks."""
    ids = []
    for turn in range(turns):
        body = {"input": f"Turn {turn}: and then?", "max_output_tokens": 4, "temperature": 0, "attention_window": 252}
        if previous is not None:
            body["previous_response_id"] = previous
        response = httpx.post(url + "/v1/responses", json=body, timeout=60)
        assert response.status_code == 200, (turn, response.text)
        previous = response.json()["id"]
        ids.append(previous)
    return ids


def test_response_chains_are_found_on_either_replica_and_survive_restarts(cluster):
    url, replicas = cluster
    before = [_prompt_tokens(r) for r in replicas]
    chains = [_chain(url, 20) for _ in range(2)]
    assert all(_prompt_tokens(r) > b for r, b in zip(replicas, before))  # both replicas served turns
    for response_id in chains[0][::4] + chains[1][::4]:
        for _ in range(3):
            assert httpx.get(f"{url}/v1/responses/{response_id}", timeout=60).status_code == 200
    # Both replicas restart (on their ports, behind the same balancer): the chains go on.
    for i, replica in enumerate(replicas):
        replica.stop()
        replicas[i] = ServerProcess(*replica.args, env=replica.env, port=replica.port)
    for chain in chains:
        continued = _chain(url, 2, previous=chain[-1])
        conversation = httpx.get(f"{url}/v1/responses/{continued[-1]}/input_items?limit=100", timeout=60)
        assert conversation.status_code == 200
        assert httpx.get(f"{url}/v1/responses/{chain[0]}", timeout=60).json()["id"] == chain[0]


def test_the_compose_balancer_refuses_to_be_published_without_a_key(tmp_path):
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())
    balancer = compose["services"]["loadbalancer"]
    assert balancer["ports"] == ["${SINKSERVE_BIND:-127.0.0.1}:8000:8000"]
    script = balancer["entrypoint"][2].replace("$$", "$")
    fake = tmp_path / "nginx"
    fake.write_text("#!/bin/sh\necho nginx started\n")
    fake.chmod(0o755)

    def start(**env):
        return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=10,
                              env={"PATH": f"{tmp_path}:/usr/bin:/bin", **env})

    for env in ({"SINKSERVE_BIND": "127.0.0.1"}, {"SINKSERVE_BIND": "0.0.0.0", "SINKSERVE_API_KEY": "k"}):
        assert start(**env).stdout == "nginx started\n", env
    refused = start(SINKSERVE_BIND="0.0.0.0", SINKSERVE_API_KEY="")
    assert refused.returncode == 1 and "set SINKSERVE_API_KEY" in refused.stderr and not refused.stdout
    for service in ("sinkserve-1", "sinkserve-2"):
        assert compose["services"][service]["ports"][0].startswith("127.0.0.1:")
    assert "redis://redis:6379/0" in compose["x-sinkserve"]["command"]
