"""Start the real server (`python -m server`) as a subprocess on a free loopback port."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
# Each test server keeps its stored responses (the default --response-store, under
# $XDG_STATE_HOME) in a folder of its own, not the user's; servers meant to share a store (the
# replicas of a test, a restarted server) are given the same XDG_STATE_HOME in `env`.
STATE_ROOT = tempfile.mkdtemp(prefix="sinkserve-test-state-")
atexit.register(shutil.rmtree, STATE_ROOT, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A running server; `url` is its base URL. Use as a context manager or call stop()."""

    def __init__(self, *args: str, env: dict | None = None, startup_timeout: float = 120.0, port: int | None = None):
        self.args = args
        self.env = {"XDG_STATE_HOME": tempfile.mkdtemp(dir=STATE_ROOT), **(env or {})}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "server", "--port", str(self.port), "--threads", "1",
                   "--log-level", "warning", *args]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sinkserve-test-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **self.env})
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def metric(self, name: str) -> float:
        """The value of an unlabelled-by-us metric line (first sample named exactly `name`)."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def stream_events(url: str, body: dict) -> list[str]:
    """The data of every SSE event of a streamed completion, [DONE] included."""
    events = []
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    return events


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Poll predicate until it is true or timeout seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def rss_mb(pid: int) -> float:
    """The resident memory of a process, in MiB (/proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


class Probe:
    """Sends `request(client)` (True: answered as expected) every `interval` seconds in a thread
    while an attack runs, with a client timeout of `timeout`: its latencies, and its failures
    (the count; a timeout counts as one)."""

    def __init__(self, request: Callable[[httpx.Client], bool], timeout: float, interval: float = 0.1,
                 name: str = "probes"):
        self.request, self.timeout, self.interval, self.name = request, timeout, interval, name
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = self.request(client)
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.latencies.append(time.perf_counter() - start)
                else:
                    self.failures += 1
                self._stop.wait(self.interval)

    def __enter__(self) -> "Probe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        worst = max(self.latencies, default=0) * 1000
        return f"{len(self.latencies)} {self.name} answered (slowest {worst:.0f} ms), {self.failures} failed"


def health_probe(server: ServerProcess) -> Probe:
    """/health every 100 ms with a 2 s timeout."""
    return Probe(lambda client: client.get(f"{server.url}/health").status_code == 200, timeout=2.0)
