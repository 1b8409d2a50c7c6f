"""Retry and shutdown helpers shared by every part: backoff for temporary errors and a
bounded cancel of background tasks. Only temporary errors are retried (see
``common.etcd``: ``EtcdUnavailable`` is temporary, ``EtcdError`` permanent)."""

from __future__ import annotations

import asyncio
import random


async def cancel_and_wait(task: asyncio.Task | None, timeout_s: float = 5.0) -> None:
    """Cancel a background task and wait (bounded) until it has stopped; its errors are dropped
    (the owner is shutting it down). No-op for None."""
    if task is None:
        return
    task.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except (asyncio.CancelledError, asyncio.TimeoutError, Exception):
        pass


class Backoff:
    """Exponential backoff with jitter for temporary errors (seconds)."""

    def __init__(self, first_s: float = 0.1, max_s: float = 2.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._next = first_s

    def reset(self) -> None:
        self._next = self.first_s

    async def sleep(self) -> None:
        delay = self._next * (0.5 + random.random() / 2)
        self._next = min(self._next * 2, self.max_s)
        await asyncio.sleep(delay)
