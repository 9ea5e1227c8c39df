"""A real Redis server for the tests (`redis-server` from the system's packages: .ci/run installs
it where it can; the tests that need it skip without it)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.server_process import free_port

REDIS_SERVER = shutil.which("redis-server") or next(
    (path for path in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(path).exists()), None)


class RedisServer:
    """redis-server on a free port of 127.0.0.1, nothing saved to disk; `url` names database 0."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        client.close()

    def flush(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as client:
            client.flushdb()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
