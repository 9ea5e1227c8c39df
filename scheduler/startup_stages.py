"""Startup progress: one log line per stage done (tokenizer, weights, KV pool, CUDA graphs), with
the seconds it took."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("scheduler.engine")


class StartupStages:
    def __init__(self) -> None:
        self.last = time.perf_counter()

    def done(self, message: str, *args) -> None:
        now = time.perf_counter()
        logger.info(message + " (%.1f s)", *args, now - self.last)
        self.last = now
