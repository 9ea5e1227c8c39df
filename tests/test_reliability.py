"""Soak: mixed streaming and non-streaming load with random disconnects against a real server.

Nothing may be lost (every request that stays connected gets a complete answer) and nothing may
leak (KV blocks back to idle, no request left running, resident memory flat, server healthy).
CI runs it for SINKSERVE_SOAK_SECONDS (default 20); `-m slow` adds a 10-minute run. Each run
prints its figures (see RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import httpx
import pytest

from tests.server_process import ServerProcess

WORKERS = 8


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Soak:
    def __init__(self, url: str, seconds: float, seed: int):
        self.url, self.seconds, self.seed = url, seconds, seed
        self.counts = {"requests": 0, "completed": 0, "disconnected": 0}
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        deadline = time.monotonic() + self.seconds
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while time.monotonic() < deadline:
                self.count("requests")
                try:
                    self.one_request(client, rng)
                except Exception as exc:  # noqa: BLE001 - any failure is a finding
                    with self.lock:
                        self.failures.append(repr(exc))

    def one_request(self, client: httpx.Client, rng: random.Random) -> None:
        chat = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"max_tokens": rng.randint(1, 48), "temperature": rng.choice([0.0, 0.8]), "seed": rng.randint(0, 99)}
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(["Tell me a story", "Hi", "Once upon"])}]
        else:
            body["prompt"] = rng.choice(["Once upon a time", "The cat", "Lily and Ben"]) * rng.randint(1, 6)
        stream = rng.random() < 0.6
        disconnect = rng.random() < 0.25
        if not stream:
            try:  # a disconnecting client gives up before the answer
                response = client.post(path, json=body, timeout=rng.uniform(0.005, 0.05) if disconnect else 120)
            except httpx.TimeoutException:
                if not disconnect:
                    raise
                self.count("disconnected")
                return
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] in ("stop", "length"), choice
            self.count("completed")
            return
        events = 0
        with client.stream("POST", path, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            finished = done = False
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                assert "error" not in event, event
                events += 1
                finished |= any(c.get("finish_reason") for c in event["choices"])
                if disconnect and events >= 2:
                    self.count("disconnected")
                    return  # leaving the block closes the connection mid-stream
        assert finished and done
        self.count("completed")


def wait_idle(server: ServerProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (server.metric("sinkserve_num_requests_running") == 0
                and server.metric("sinkserve_num_requests_waiting") == 0
                and server.metric("sinkserve_kv_blocks_used") == 0):
            return
        time.sleep(0.1)
    raise AssertionError("the server did not return to idle")


def run_soak(seconds: float) -> None:
    with ServerProcess("--max-num-seqs", "16", "--num-kv-blocks", "96") as server:
        warm = Soak(server.url, min(5.0, seconds / 4), seed=1)
        warm.worker(0)  # warm-up: allocator and caches settle
        wait_idle(server)
        rss_before = rss_bytes(server.process.pid)
        soak = Soak(server.url, seconds, seed=2)
        threads = [threading.Thread(target=soak.worker, args=(i,)) for i in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_idle(server)
        rss_after = rss_bytes(server.process.pid)
        health = httpx.get(server.url + "/health").status_code
        print(f"\nsoak {seconds:.0f} s, {WORKERS} clients: {soak.counts}, failures {len(soak.failures)}, "
              f"preemptions {server.metric('sinkserve_preemptions_total'):.0f}, "
              f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
        assert not soak.failures, soak.failures[:5]
        assert soak.counts["completed"] + soak.counts["disconnected"] == soak.counts["requests"]
        assert soak.counts["disconnected"] > 0 and soak.counts["completed"] > 0
        assert health == 200
        assert rss_after - rss_before < 64 * 2**20, "resident memory grew"


def test_soak_short():
    run_soak(float(os.environ.get("SINKSERVE_SOAK_SECONDS", "20")))


@pytest.mark.slow
def test_soak_long():
    run_soak(600.0)


def test_overload_is_refused_fast_and_the_admitted_finish():
    with ServerProcess("--max-num-seqs", "4", "--max-waiting-requests", "8") as server:
        statuses: list[tuple[int, str | None, float]] = []
        lock = threading.Lock()

        def send(i: int) -> None:
            start = time.monotonic()
            response = httpx.post(server.url + "/v1/completions", timeout=120,
                                  json={"prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True, "seed": i})
            if response.status_code == 200:
                assert response.json()["usage"]["completion_tokens"] == 64
            with lock:
                statuses.append((response.status_code, response.headers.get("retry-after"), time.monotonic() - start))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_idle(server)
        codes = [code for code, _, _ in statuses]
        refused = [(after, seconds) for code, after, seconds in statuses if code == 503]
        print(f"\noverload: 100 requests, {codes.count(200)} served, {len(refused)} refused "
              f"(slowest refusal {max(s for _, s in refused):.2f} s)")
        assert len(statuses) == 100 and set(codes) <= {200, 503}
        assert codes.count(200) >= 12 and refused, "the queue bound was not applied"
        assert all(after == "1" for after, _ in refused)
        assert httpx.get(server.url + "/health").status_code == 200
