"""Node registration: NodeInfo under an etcd lease, kept alive, re-registered when lost.

Life of a registration::

    unregistered --grant lease + put NodeInfo--> registered --lease lost--> unregistered
         ^   |                                                   (expired, revoked, etcd
         |   +-- etcd unavailable: back off, retry                unreachable > TTL)
         +-------------------------------------------------------------------+

While etcd is down the loop keeps retrying with backoff (temporary error); a
lease that etcd still knows after it comes back is simply refreshed, one it
lost is replaced by a new lease and NodeInfo is written again. A refusal
(``EtcdError``, e.g. permission denied) is permanent: the registration gives up,
keeps the error in ``refused`` and sets ``ended`` (the agent stops). Keys written
with ``put_leased`` (the health record) live and die with the node.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

from agent import metrics
from agent.retrylog import FailureLog
from common.etcd import Etcd, EtcdError, EtcdUnavailable, LeaseKeeper, LeaseLost
from common.retry import Backoff, cancel_and_wait
from protos.keys import Keys

log = logging.getLogger(__name__)


class Registration:
    def __init__(self, *, etcd: Etcd, keys: Keys, node_id: str, ttl_s: int,
                 node_info: Callable[[], dict[str, Any]]) -> None:
        self.etcd = etcd
        self.keys = keys
        self.node_id = node_id
        self.ttl_s = ttl_s
        self.node_info = node_info
        self.lease_id: int | None = None
        self.registrations = 0
        """How many times NodeInfo was written under a new lease."""
        self.registered = asyncio.Event()
        self.ended = asyncio.Event()
        """Set when the registration gave up for good (``refused`` says why)."""
        self.refused: EtcdError | None = None
        self._lost = asyncio.Event()
        self._keeper: LeaseKeeper | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"registration-{self.node_id}")

    async def stop(self, *, revoke: bool = True) -> None:
        await cancel_and_wait(self._task)
        if self._keeper:
            await self._keeper.stop(revoke=revoke)  # revoking deletes NodeInfo: NOT_READY at once

    async def _on_lost(self, reason: str) -> None:
        self._lost.set()

    async def _register_once(self) -> None:
        lease = await self.etcd.grant_lease(self.ttl_s)
        try:
            await self.etcd.put(self.keys.node(self.node_id), json.dumps(self.node_info()), lease=lease)
        except (EtcdError, EtcdUnavailable):
            try:
                await self.etcd.revoke_lease(lease)
            except (EtcdError, EtcdUnavailable):
                pass
            raise
        old = self._keeper
        self.lease_id = lease
        self._lost.clear()
        self._keeper = LeaseKeeper(self.etcd, lease, self.ttl_s, on_lost=self._on_lost)
        self._keeper.start()
        self.registrations += 1
        self.registered.set()
        if old is not None:
            await old.stop(revoke=True)  # a lease etcd kept across its restart must not linger
        log.info("node %s registered (lease %x, ttl %d s)", self.node_id, lease, self.ttl_s)

    async def _run(self) -> None:
        backoff = Backoff(0.1, 1.0)
        failures = FailureLog(log, f"registration of node {self.node_id}")
        while True:
            try:
                await self._register_once()
                failures.ok()
                backoff.reset()
            except EtcdUnavailable as exc:
                failures.failed(exc)
                await backoff.sleep()
                continue
            except EtcdError as exc:
                log.error("registration of node %s refused by etcd, not retried: %s", self.node_id, exc)
                self.refused = exc
                self.ended.set()
                return
            await self._lost.wait()
            self.registered.clear()
            self.lease_id = None
            metrics.LEASE_LOST.inc()
            log.warning("node %s: lease lost, registering again", self.node_id)

    async def update_info(self) -> bool:
        """Rewrite NodeInfo (e.g. the condition changed); False while unregistered (the next
        registration writes the current NodeInfo anyway)."""
        return await self.put_leased(self.keys.node(self.node_id), json.dumps(self.node_info()))

    async def put_leased(self, key: str, value: str) -> bool:
        """Write ``key`` under the current lease; False while unregistered."""
        lease = self.lease_id
        if lease is None:
            return False
        try:
            await self.etcd.put(key, value, lease=lease)
        except LeaseLost:
            self._lost.set()
            return False
        return True
